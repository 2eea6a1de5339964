"""What a job handler gets: :class:`JobContext`, the one type every ``run(ctx)`` takes.

The worker's runner thread (:class:`finetune_worker.server.jobs.WorkerJobContext`) and a torchrun
rank (:class:`finetune_worker.training.distributed.rank_main.RankContext`) provide it. A handler
reads its validated ``config``, reports through :meth:`JobContext.emit` and the helpers, and
stops at safe points when :attr:`JobContext.cancelled`. ``rank`` is None in the worker and the
process's rank inside a torchrun group.
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from finetune_worker.errors import JobCancelled


class RequestTimeout(Exception):
    """A :meth:`JobContext.request` that got no answer (in time, or at all); the message says why."""


class CancelFlag(Protocol):
    """What a cancel flag must do: a ``threading.Event``, or a rank's agreed stop."""

    def is_set(self) -> bool: ...


class JobContext:
    """Cancel flag and reporting helpers; subclasses set the attributes and implement :meth:`emit`."""

    job_id: str
    kind: str
    config: Any  # the kind's validated pydantic model
    cancel_event: CancelFlag
    rank: int | None = None
    resume_from: Path | None = None  # a rank's checkpoint to resume from (the launcher chose it)
    #: Where a train job keeps its tokenized data; None: its output folder's ``.data-cache``. A
    #: sweep's trials share one (they differ in hyperparameters only, never in their data).
    data_cache: Path | None = None

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def check_cancelled(self, step: int = 0, checkpoint: str | None = None) -> None:
        """Raise :class:`JobCancelled` if a cancel was asked for (call it at safe points)."""
        if self.cancel_event.is_set():
            raise JobCancelled(step=step, checkpoint=checkpoint)

    def check_cancelled_alone(self) -> None:
        """:meth:`check_cancelled` at a point the other ranks of a distributed job do not reach
        in step (work one rank does while the rest wait for it, such as building the data
        cache): this process's own view of the cancel, never a collective call."""
        is_set = getattr(self.cancel_event, "is_set_here", self.cancel_event.is_set)
        if is_set():
            raise JobCancelled(step=0)

    def emit(self, type: str, **payload: Any) -> None:
        """Send one event of this job (``type`` one of ``wire.vocabulary.EVENT_TYPES``)."""
        raise NotImplementedError

    def request(self, type: str, payload: dict[str, Any], *, size: int, timeout_s: float) -> list[Any] | None:
        """Ask the job's subscriber for ``size`` values and wait for them: a ``type`` event whose
        payload gains a ``request`` number, answered through the worker's API (``rewards/3``).

        Returns the values, or None when the job is cancelled while it waits; raises
        :class:`RequestTimeout` when no answer comes within ``timeout_s`` (or none can come).
        """
        raise RequestTimeout("this job runs where nothing can answer a request (no BEAM)")

    def progress(self, done: int, total: int, *, unit: str, started: float) -> None:
        """A ``progress`` event for work counted in ``unit``s (modules, tasks, rows) since ``started``.

        ``started`` is a ``time.monotonic()`` reading; the ETA assumes the remaining units cost
        what the finished ones did.
        """
        elapsed = time.monotonic() - started
        self.emit(
            "progress",
            step=done,
            total_steps=total,
            done=done,
            total=total,
            unit=unit,
            percent=round(100.0 * done / total, 1) if total else 100.0,
            elapsed_s=round(elapsed, 3),
            eta_s=round(elapsed / done * (total - done), 3) if done else None,
        )

    def phase(self, name: str) -> None:
        self.emit("phase", phase=name)

    def log(self, message: str, level: str = "info") -> None:
        self.emit("log", level=level, message=message)


def release_memory(*, unfreeze: bool = False) -> None:
    """Collect garbage and hand cached GPU memory back: the worker outlives a job, and the next
    job (or another process) needs what this one held. During a job the runner keeps the heap
    from before it frozen (``server.jobs``), so this collects the job's own objects only, in
    milliseconds; ``unfreeze``: the runner's once the job is over, everything."""
    if unfreeze:
        gc.unfreeze()
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
