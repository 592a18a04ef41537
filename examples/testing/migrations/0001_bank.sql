-- migrate:up
CREATE TABLE bank_accounts (
  id serial PRIMARY KEY,
  owner text NOT NULL UNIQUE,
  balance int NOT NULL CHECK (balance >= 0)
);
CREATE TABLE bank_transfers (
  id serial PRIMARY KEY,
  from_id int NOT NULL REFERENCES bank_accounts DEFERRABLE INITIALLY DEFERRED,
  to_id int NOT NULL REFERENCES bank_accounts DEFERRABLE INITIALLY DEFERRED,
  amount int NOT NULL CHECK (amount > 0)
);

-- migrate:down
DROP TABLE bank_transfers, bank_accounts;
