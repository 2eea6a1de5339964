"""Training jobs: model loading, data pipeline, Trainer wiring, events, checkpoints."""
