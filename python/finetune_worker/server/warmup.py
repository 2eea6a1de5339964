"""Import the training stack in the background as soon as the worker is up.

A fresh worker's first job used to wait about 7 s from ``submit`` to its first ``progress`` event
on a 2-core machine: its runner thread imported torch, transformers, peft, datasets and
accelerate first (the second job in the same worker waits about 1 s). The warm-up thread imports
them right after the worker starts serving, then does the one-time work of the first model load
(:func:`_prime`), so a job submitted a few seconds later finds them loaded, and one submitted
sooner waits for the warm-up to finish (:meth:`Warmup.before_job`) rather than import beside it.

What it costs, and who turns it off: the modules stay loaded, about 500 MiB of resident memory
that the process cannot give back (``make bench``, part ``startup``, measures it), and a few
seconds of one core at start-up. ``info`` is answered meanwhile, the import thread holding the
GIL only in short stretches; nothing touches a GPU (importing torch does not initialize CUDA).
A worker that will never train (one that only validates, a pool's spare) starts with
``--no-warm`` or ``FINETUNE_WORKER_WARM=0`` (from Elixir: ``args: ["--no-warm"]``).
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import time

log = logging.getLogger(__name__)

#: What a training job imports before its first step, heaviest first (each brings its own deps).
MODULES = (
    "torch",
    "transformers",
    "peft",
    "datasets",
    "accelerate",
    "transformers.trainer",
    "transformers.models.auto.modeling_auto",
    "finetune_worker.training.job",
    "finetune_worker.training.trainer",
    "finetune_worker.training.model",
    "finetune_worker.training.data",
)
ENV = "FINETUNE_WORKER_WARM"


def _prime() -> None:
    """What the first ``from_pretrained`` of a process does once, whatever the model: transformers
    5 compiles its table of checkpoint weight renamings (~1,000 regular expressions, 0.4 s of a
    fresh worker's first job here). A transformers without that table has nothing to prime."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return
    get_checkpoint_conversion_mapping("llama")


def enabled_by_env(default: bool = True) -> bool:
    """``FINETUNE_WORKER_WARM``: ``0``/``false``/``no``/``off`` turn the warm-up off."""
    value = os.environ.get(ENV)
    if value is None:
        return default
    return value.strip().lower() not in ("0", "false", "no", "off", "")


class Warmup:
    """The warm-up's state, for ``info``: ``off``, ``warming``, ``ready`` or ``failed``."""

    def __init__(self, enabled: bool):
        self.state = "warming" if enabled else "off"
        self.seconds: float | None = None
        self._enabled = enabled
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if not self._enabled or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="finetune-warmup", daemon=True)
        self._thread.start()

    def before_job(self) -> None:
        """What the runner calls before each job: start the warm-up if it has not started, and
        wait for it. A job never imports the training stack beside it: two threads importing the
        same packages at once can each wait on a module the other holds, and Python then hands
        one of them a half-initialized module ("cannot import name 'TrainerCallback' from
        'transformers'"); on 2 cores it was also slower than importing alone."""
        self.start()
        self.wait()

    def wait(self, timeout: float | None = None) -> bool:
        """True once the warm-up has finished (or was never on)."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.state != "warming"

    def _run(self) -> None:
        started = time.monotonic()
        try:
            for name in MODULES:
                importlib.import_module(name)
        except BaseException as exc:  # a broken install: the job that needs it will say what is wrong
            self.state = "failed"
            log.warning("warm-up import failed (%s: %s); jobs import on their own", type(exc).__name__, exc)
            return
        finally:
            self.seconds = round(time.monotonic() - started, 3)
        try:
            _prime()
        except Exception as exc:  # another transformers: the first model load does it, as before
            log.warning("warm-up: could not prepare the first model load (%s: %s)", type(exc).__name__, exc)
        self.seconds = round(time.monotonic() - started, 3)
        self.state = "ready"
        log.info("warm-up: training stack imported in %.1f s", self.seconds)
