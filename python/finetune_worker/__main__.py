"""``python -m finetune_worker``: the same entry point as the ``finetune-worker`` console script."""

import sys

from finetune_worker.cli import main

if __name__ == "__main__":
    sys.exit(main())
