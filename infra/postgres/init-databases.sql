-- Runs once, when the data volume is first initialised. POSTGRES_DB creates `mlflow`; Prefect gets a
-- database of its own so that neither application's migrations can touch the other's tables.
CREATE DATABASE prefect;
