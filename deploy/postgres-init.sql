-- A second database for MLflow's tracking and registry store next to Dagster's.
CREATE DATABASE mlflow;
