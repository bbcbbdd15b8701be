"""Prefect flows over the DVC stages: the whole pipeline and retraining (`pipeline`), and the
Optuna study of short training runs (`hpo`). Their deployments are in pipelines/prefect.yaml."""
