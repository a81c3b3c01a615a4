"""The sdtune pipeline: Ray Tune sweeps of Ray Train / DeepSpeed trials, MLflow tracking and adapter export."""
