"""Job queue, the one runner thread, and the context (:class:`WorkerJobContext`) a handler gets.

One GPU, one job: jobs run in FIFO order on a single runner thread. The main thread
only submits, queries and cancels, which all return at once. A job handler is a plain
function ``run(ctx: JobContext) -> dict`` named by its kind (:mod:`finetune_worker.kinds`); it is
imported lazily on the runner thread, so torch and transformers never slow the main
thread. It reports through ``ctx`` and returns the ``completed`` payload, raises
:class:`JobCancelled` when it stopped on request, or raises anything else to fail.
"""

from __future__ import annotations

import gc
import itertools
import logging
import math
import os
import secrets
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from finetune_worker import kinds
from finetune_worker.context import JobContext, RequestTimeout, release_memory
from finetune_worker.errors import JobCancelled, JobFailed
from finetune_worker.failures import classify_exception
from finetune_worker.wire.vocabulary import TERMINAL_TYPES as TERMINAL_STATES
from finetune_worker.wire.vocabulary import Event

log = logging.getLogger("finetune_worker.server.jobs")

#: Finished jobs ``status``/``jobs`` still know; older ones are forgotten, oldest first (a worker
#: that runs for months must not grow its table without bound).
MAX_FINISHED_JOBS = 1000

#: Event sink: called with every event of every job, from whichever thread emits it.
Sink = Callable[["JobRecord", Event], None]


@dataclass
class JobRecord:
    """Everything ``status`` reports about a job. Mutated only under ``JobManager._lock``."""

    job_id: str
    kind: str
    config: Any  # the validated pydantic model
    reply_to: Any = None  # opaque (a pid term in port mode)
    state: str = "queued"  # queued | running | completed | failed | cancelled
    submitted_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    step: int = 0
    total_steps: int | None = None
    phase: str | None = None
    last_metrics: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None

    def to_status(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "kind": self.kind,
            "state": self.state,
            "phase": self.phase,
            "step": self.step,
            "total_steps": self.total_steps,
            "metrics": dict(self.last_metrics),
            "outputs": dict(self.outputs),
            "error": self.error,
            "submitted_at": self.submitted_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }


class WorkerJobContext(JobContext):
    """The context of a job run by this worker's runner thread."""

    def __init__(self, manager: JobManager, record: JobRecord):
        self._manager = manager
        self._record = record
        self.job_id = record.job_id
        self.kind = record.kind
        self.config = record.config
        self.stop = threading.Event()  # what the manager sets; handlers read it as cancel_event
        self.cancel_event = self.stop

    def emit(self, type: str, **payload: Any) -> None:
        """Send one event to the job's subscriber (and keep ``status`` up to date)."""
        self._manager._emit(self._record, type, payload)

    def request(self, type: str, payload: dict[str, Any], *, size: int, timeout_s: float) -> list[Any] | None:
        return self._manager._request(self, self._record, type, payload, size, timeout_s)


@dataclass
class _Pending:
    """A request of a running job, waiting for the BEAM's answer (``JobManager.answer``)."""

    size: int
    done: threading.Event = field(default_factory=threading.Event)
    values: list[Any] | None = None


#: How often a waiting request looks at the job's cancel flag.
REQUEST_POLL_S = 0.1


class JobManager:
    """The FIFO, the runner thread and the job table."""

    def __init__(
        self, sink: Sink, *, job_prefix: str | None = None, before_job: Callable[[], object] | None = None
    ):
        self._sink = sink
        #: Called on the runner thread before each job (the worker's: wait for the warm-up).
        self._before_job = before_job
        self._lock = threading.Lock()
        # Every event goes out under this lock, so a job's events keep their order even when two
        # threads report on it (the runner re-sending queue positions, a cancel from the main
        # thread); held apart from _lock so that status calls never wait on a slow BEAM.
        self._emit_lock = threading.RLock()
        self._wakeup = threading.Condition(self._lock)
        self._queue: deque[JobRecord] = deque()
        self._jobs: dict[str, JobRecord] = {}
        self._current: tuple[JobRecord, WorkerJobContext] | None = None
        self._closing = False
        self._sink_failures = 0
        self._ids = itertools.count(1)
        self._requests: dict[tuple[str, int], _Pending] = {}
        self._request_ids = itertools.count(1)
        # Unique across processes and machines (a pool relays several workers' jobs by their
        # ids): the pid alone repeats across containers, the second of the start across a rollout.
        self._prefix = job_prefix or f"job-{os.getpid()}-{secrets.token_hex(4)}"
        self._runner = threading.Thread(target=self._run_loop, name="finetune-runner", daemon=True)
        self._runner.start()

    # ---- called from the main thread; all return at once -----------------------------------

    def submit(self, kind: str, config: Any, reply_to: Any = None) -> str:
        with self._lock:
            if self._closing:
                raise RuntimeError("the worker is shutting down and accepts no new jobs")
            job_id = f"{self._prefix}-{next(self._ids)}"
            record = JobRecord(job_id=job_id, kind=kind, config=config, reply_to=reply_to)
            self._jobs[job_id] = record
            self._prune()
            position = len(self._queue) + 1 + (1 if self._current else 0)
        # `queued` goes out before the runner can see the job, so no subscriber ever gets
        # `started` ahead of `queued`.
        self._emit(record, "queued", {"position": position, "kind": kind})
        with self._lock:
            if not self._closing:
                self._queue.append(record)
                self._wakeup.notify_all()
                return job_id
            record.state = "cancelled"
            record.finished_at = time.time()
        self._send(record, Event(record.job_id, "cancelled", {"step": 0, "checkpoint": None}))
        return job_id

    def status(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            record = self._jobs.get(job_id)
            return record.to_status() if record else None

    def jobs(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r.to_status() for r in self._jobs.values()]

    def queue_length(self) -> int:
        with self._lock:
            return len(self._queue)

    def runner_busy(self) -> bool:
        """Whether the runner thread still runs: after :meth:`close`, a job (or its clean-up)
        that outlived the grace period."""
        return self._runner.is_alive()

    def running(self) -> str | None:
        with self._lock:
            return self._current[0].job_id if self._current else None

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued job at once, or ask the running one to stop at its next step boundary."""
        with self._lock:
            record = self._jobs.get(job_id)
            if record is None:
                return False
            if record.state == "queued" and record in self._queue:
                self._queue.remove(record)
                record.state = "cancelled"
                record.finished_at = time.time()
                queued_cancel = True
            elif self._current and self._current[0] is record:
                self._current[1].stop.set()
                return True
            else:
                return True  # already finished: cancelling is a no-op, not an error
        if queued_cancel:
            self._send(record, Event(record.job_id, "cancelled", {"step": 0, "checkpoint": None}))
        return True

    def answer(self, job_id: str, request: int, values: list[Any]) -> str | None:
        """Deliver the answer to request ``request`` of job ``job_id``: None when taken, else why
        not ("not_found" when no such request waits: answered already, timed out, or never sent)."""
        with self._lock:
            pending = self._requests.get((job_id, request))
            if pending is None:
                return "not_found"
            if len(values) != pending.size:
                return f"request {request} asked for {pending.size} values, got {len(values)}"
            bad = next((i for i, v in enumerate(values) if not _is_score(v)), None)
            if bad is not None:
                value = values[bad]
                # repr() of an int over 4,300 digits raises: name its size instead
                big = isinstance(value, int) and not isinstance(value, bool)
                shown = f"an integer of {value.bit_length()} bits" if big else repr(value)[:80]
                return f"value {bad + 1} is {shown}: each must be a number within ±1e30, or nil"
            del self._requests[(job_id, request)]
            pending.values = list(values)
            pending.done.set()
            return None

    def _request(
        self,
        ctx: WorkerJobContext,
        record: JobRecord,
        type: str,
        payload: dict[str, Any],
        size: int,
        timeout_s: float,
    ) -> list[Any] | None:
        """Runner thread: send ``type`` with a new request number and wait for ``answer``."""
        if record.reply_to is None:
            raise RequestTimeout("the job was submitted without a subscriber, so nothing can answer it")
        request = next(self._request_ids)
        pending = _Pending(size)
        key = (record.job_id, request)
        with self._lock:
            self._requests[key] = pending
        try:
            self._emit(record, type, {"request": request, **payload})
            deadline = time.monotonic() + timeout_s
            while not pending.done.wait(REQUEST_POLL_S):
                with self._lock:  # settled under the lock that answer() takes: never both
                    if pending.done.is_set():
                        break
                    if ctx.cancelled or time.monotonic() >= deadline:
                        self._requests.pop(key, None)  # a late answer now gets not_found
                        if ctx.cancelled:
                            return None
                        raise RequestTimeout(f"request {request} was sent to {record.reply_to!r}")
            return pending.values
        finally:
            with self._lock:
                self._requests.pop(key, None)

    def close(self, grace_s: float) -> bool:
        """Stop accepting jobs, cancel everything, and wait up to ``grace_s`` for the running job.

        Returns True when the runner finished in time. The caller decides what to do
        otherwise (the worker process exits anyway: no orphan may keep a GPU busy).
        """
        with self._lock:
            self._closing = True
            pending = list(self._queue)
            self._queue.clear()
            if self._current:
                self._current[1].stop.set()
            self._wakeup.notify_all()
        for record in pending:
            record.state = "cancelled"
            self._send(record, Event(record.job_id, "cancelled", {"step": 0, "checkpoint": None}))
        self._runner.join(timeout=max(0.0, grace_s))
        return not self._runner.is_alive()

    # ---- runner thread ------------------------------------------------------------------------

    def _run_loop(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closing:
                    self._wakeup.wait()
                if self._closing and not self._queue:
                    return
                record = self._queue.popleft()
                ctx = WorkerJobContext(self, record)
                self._current = (record, ctx)
                record.state = "running"
                record.started_at = time.time()
                waiting = list(self._queue)
            with self._emit_lock:
                for i, other in enumerate(waiting, start=1):
                    if other.state == "queued":  # not cancelled since the snapshot: no queued after its end
                        self._emit(other, "queued", {"position": i + 1, "kind": other.kind})
            if self._before_job is not None:
                try:
                    self._before_job()
                except Exception as exc:  # the job imports what it needs itself, as without it
                    log.warning("before job %s: %s: %s", record.job_id, type(exc).__name__, exc)
            # Everything alive before the job (the imported training stack: hundreds of thousands
            # of objects) is frozen out of the cyclic collector while it runs, so the full
            # collections made during it (the Trainer's own at the start of train(), the job's
            # own when it ends, Python's automatic ones) skip that heap: ~0.3 s each here. After
            # the terminal event it is unfrozen and collected once, so a cycle among those older
            # objects that died meanwhile is freed too; not when the worker is closing (it exits).
            gc.freeze()
            try:
                self._run_one(record, ctx)
            finally:
                with self._lock:
                    self._current = None
                    closing = self._closing
                if not closing:
                    self._release_memory()

    def _run_one(self, record: JobRecord, ctx: WorkerJobContext) -> None:
        self._emit(record, "started", {"kind": record.kind})
        try:
            _check_still_confined(record)
            handler = _load_handler(record.kind)
            result = handler(ctx) or {}
        except JobCancelled as exc:
            self._finish(record, "cancelled", {"step": exc.step, "checkpoint": exc.checkpoint})
        except JobFailed as exc:
            self._finish(
                record,
                "failed",
                {"error": exc.error, "message": exc.message, "hint": exc.hint, "details": exc.details},
            )
        except BaseException as exc:  # a job must never take the worker down with it
            failure = classify_exception(exc)
            log.error("job %s failed: %s\n%s", record.job_id, exc, traceback.format_exc())
            self._finish(
                record,
                "failed",
                {"error": failure.error, "message": failure.message, "hint": failure.hint},
            )
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
        else:
            if ctx.cancelled and result.get("cancelled"):
                self._finish(
                    record, "cancelled", {"step": record.step, "checkpoint": result.get("checkpoint")}
                )
            else:
                self._finish(record, "completed", result)

    def _release_memory(self) -> None:
        try:
            release_memory(unfreeze=True)
        except Exception as exc:  # a CUDA fault that sticks: the next job reports it, as its failure
            log.warning("could not release memory after a job: %s: %s", type(exc).__name__, exc)

    def _finish(self, record: JobRecord, type: str, payload: dict[str, Any]) -> None:
        with self._lock:
            record.state = type
            record.finished_at = time.time()
            # Not running any more once its terminal event is out: a job submitted in answer
            # to that event must not count this one as ahead of it.
            if self._current and self._current[0] is record:
                self._current = None
        self._emit(record, type, payload)

    def _emit(self, record: JobRecord, type: str, payload: dict[str, Any]) -> None:
        event = Event(record.job_id, type, payload)
        with self._lock:
            _update_record(record, event)
        try:
            self._send(record, event)
        except Exception as exc:  # a broken sink (closed pipe) must not kill the runner mid-job
            # Once the BEAM is gone every later event fails the same way: say so once, not per event.
            if self._sink_failures == 0:
                log.warning("could not deliver %s event of job %s: %s", type, record.job_id, exc)
            self._sink_failures += 1

    def _prune(self) -> None:
        """Forget the oldest finished jobs beyond MAX_FINISHED_JOBS (call with _lock held)."""
        finished = [r.job_id for r in self._jobs.values() if r.state in TERMINAL_STATES]
        for job_id in finished[: max(0, len(finished) - MAX_FINISHED_JOBS)]:
            del self._jobs[job_id]

    def _send(self, record: JobRecord, event: Event) -> None:
        with self._emit_lock:
            self._sink(record, event)


#: Largest reward magnitude taken: TRL sums rewards in float32, where 3.4e38 is already infinite.
MAX_SCORE = 1e30


def _is_score(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value)) and abs(float(value)) <= MAX_SCORE
    except OverflowError:  # an Erlang bignum beyond any float
        return False


def _update_record(record: JobRecord, event: Event) -> None:
    p = event.payload
    if event.type == "progress":
        record.step = int(p.get("step", record.step) or 0)
        if p.get("total_steps") is not None:
            record.total_steps = int(p["total_steps"])
    elif event.type in ("metrics", "eval"):
        values = p.get("metrics") or {}
        record.last_metrics.update({k: v for k, v in values.items() if isinstance(v, (int, float))})
        if p.get("step") is not None:
            record.step = int(p["step"])
    elif event.type == "phase":
        record.phase = p.get("phase")
    elif event.type == "completed":
        record.outputs = dict(p.get("outputs") or {})
    elif event.type == "failed":
        record.error = {k: p.get(k) for k in ("error", "message", "hint")}
    elif event.type == "checkpoint":
        record.outputs["last_checkpoint"] = p.get("path")


def _check_still_confined(record: JobRecord) -> None:
    """The job's paths again, now that it starts: a link swapped while it queued (an output_dir
    symlink pointed out of the root after submit) must not take it outside the allowed roots."""
    from finetune_worker.config import confinement_issues

    if not hasattr(record.config, "model_dump"):
        return
    issues = confinement_issues(record.config)
    if issues:
        raise JobFailed(
            "invalid_config",
            "since submit, " + "; ".join(str(i) for i in issues),
            hint="A path of this job now resolves outside the allowed roots; nothing was read or written.",
        )


def _load_handler(kind: str) -> Callable[[JobContext], dict[str, Any] | None]:
    found = kinds.get(kind)
    if found is None:
        raise JobFailed("invalid_config", f"no handler for job kind {kind!r}")
    handler: Callable[[JobContext], dict[str, Any] | None] = found.handler()
    return handler
