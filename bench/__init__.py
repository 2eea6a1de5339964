"""``make bench``: the worker measured against plain Hugging Face training, erlang_py and OTP.

Entry point :mod:`bench.run`; one module per part (``codec``, ``framing``, ``latency`` for
start-up and control latency, ``events``, ``train`` with ``losscheck``, ``gpu``); the plain
tutorial-style script A is :mod:`bench.hf_baseline`; :mod:`bench.data` builds the model and the
dataset; results are rendered by :mod:`bench.report` into BENCHMARKS.md.
"""
