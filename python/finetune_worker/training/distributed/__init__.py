"""Multi-process training: torchrun launcher, event relay, and the per-rank entry point."""
