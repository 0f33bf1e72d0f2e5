"""Training, checkpoints, evaluation and run reports."""
