"""Evaluation and generation: the ``evaluate`` and ``generate`` jobs and what they share.

``loading`` loads a model for inference, ``generation`` generates and streams text,
``scoring`` computes loss/perplexity and answer metrics (``metrics``), ``job`` runs the jobs.
"""
