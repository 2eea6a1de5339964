"""``python -m finetune_worker``: the same entry point as the ``finetune-worker`` console script."""

from finetune_worker.cli import entry

if __name__ == "__main__":
    entry()
