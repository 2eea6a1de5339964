"""finetune-worker: LLM fine-tuning driven from the BEAM.

This package is also the one module the BEAM may call: ``{'C', Id, finetune_worker, Fun, Args}``
dispatches to the functions of :mod:`finetune_worker.server.api` and nothing else. Importing it is
cheap (no torch), so the worker answers ``info`` within a fraction of a second of starting.
"""

__version__ = "0.1.0"
