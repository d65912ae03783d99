"""Training AutoSOD with Ray Train: the per-worker loop, checkpoints, the driver."""
