-- migrate:up
CREATE TABLE accounts (name text PRIMARY KEY, balance int NOT NULL CHECK (balance >= 0));

-- migrate:down
DROP TABLE accounts;
