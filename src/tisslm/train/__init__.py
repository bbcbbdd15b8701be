"""Training: the loop (trainer), checkpoints that resume exactly (checkpoint), MLflow (tracking)."""
