"""Prefect flows that run the DVC stages in DAG order (full pipeline, retraining, HPO)."""
