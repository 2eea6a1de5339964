"""The data users bring: files of every common format, rows of every common shape.

- :mod:`~finetune_worker.data.readers`: a path (file, folder, ``save_to_disk`` folder) -> its
  files -> numbered raw rows, streamed;
- :mod:`~finetune_worker.data.rows`: a raw row -> a checked :class:`~finetune_worker.data.rows.Example`
  (text, or messages with tool calls and per-turn training flags);
- :mod:`~finetune_worker.data.sources`: a job's sources, their examples, and the quick check
  ``validate`` runs before any model or tokenizer loads.

Pure Python plus pyarrow: no torch, no transformers. Tokenization lives with training
(:mod:`finetune_worker.training.data`).
"""
