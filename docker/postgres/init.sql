-- Runs once, when the postgres-data volume is empty (docker-entrypoint-initdb.d), as
-- POSTGRES_USER. Creates the two databases of the atr compose stack, both owned by that user.
CREATE DATABASE prefect;
CREATE DATABASE mlflow;

-- Prefect's migrations run CREATE EXTENSION IF NOT EXISTS pg_trgm; creating it here, as the
-- superuser, keeps them working even if POSTGRES_USER is later swapped for a non-superuser.
\connect prefect
CREATE EXTENSION IF NOT EXISTS pg_trgm;
