"""The worker's API: the only functions the BEAM may call (``{'C', Id, finetune_worker, Fun, Args}``).

Every function here is named in ``__all__`` and nothing else is callable: the dispatcher in
:mod:`finetune_worker.server.worker` looks names up in ``__all__`` and never imports anything a
call names. Each function takes the worker's :class:`Runtime` first (supplied by the
dispatcher, not by the caller), then the call's arguments as decoded terms: binaries arrive
as ``str`` (or ``bytes`` when not UTF-8), atoms as :class:`~finetune_worker.wire.Atom`.
Every function returns at once: ``submit`` validates and queues, it never trains.

Results are wire terms: maps go through :func:`~finetune_worker.wire.vocabulary.payload_term` so that
known keys are atoms and any other key a binary (a BEAM decoding with ``[safe]`` never mints
an atom). A wrong argument raises :class:`~finetune_worker.errors.CallError`, which the
dispatcher turns into an ``'e'`` reply.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import finetune_worker
from finetune_worker.errors import CallError, ConfigError, ConfigIssue, brief
from finetune_worker.server.jobs import JobManager
from finetune_worker.server.warmup import Warmup
from finetune_worker.wire import Atom, Pid
from finetune_worker.wire.vocabulary import payload_term

__all__ = ["cancel", "info", "jobs", "ping", "rewards", "shutdown", "status", "submit", "validate"]

#: Bumped when a message or API shape changes incompatibly (docs/protocol.md).
PROTOCOL_VERSION = 2

OK = Atom("ok")
ERROR = Atom("error")
NOT_FOUND = Atom("not_found")


@dataclass
class Runtime:
    """What the API functions act on: the job manager and the worker's shutdown flag."""

    manager: JobManager
    warmup: Warmup = field(default_factory=lambda: Warmup(False))
    started_at: float = field(default_factory=time.time)
    shutdown_requested: threading.Event = field(default_factory=threading.Event)


def ping(rt: Runtime) -> Atom:
    """``pong``: the cheapest liveness check."""
    return Atom("pong")


def info(rt: Runtime) -> Any:
    """Versions, devices, queue: answered without importing torch on this thread."""
    return payload_term(
        {
            "version": finetune_worker.__version__,
            "protocol": PROTOCOL_VERSION,
            "python": platform.python_version(),
            "torch": _dist_version("torch"),
            "transformers": _dist_version("transformers"),
            "peft": _dist_version("peft"),
            "devices": _devices(),
            "queue_length": rt.manager.queue_length(),
            "running": rt.manager.running(),
            "pid": os.getpid(),
            "uptime_s": round(time.time() - rt.started_at, 3),
            "warm": rt.warmup.state,
        }
    )


def validate(rt: Runtime, config: Any) -> Any:
    """``ok``, or ``{error, [#{path, message, value}]}`` listing every problem at once."""
    try:
        _parse(config)
    except ConfigError as exc:
        return (ERROR, [payload_term(issue) for issue in exc.to_terms()])
    return OK


def submit(rt: Runtime, config: Any, reply_to: Any = None) -> Any:
    """Validate, queue, and return ``{ok, JobId}`` at once (or ``{error, Issues}``).

    ``reply_to`` is the pid that receives the job's events (``nil``/``undefined`` for none:
    the job then runs silently and ``status`` is the only way to follow it).
    """
    if reply_to is not None and not isinstance(reply_to, Pid):
        raise CallError(f"submit/2: ReplyTo must be a pid or nil, got {_describe(reply_to)}")
    try:
        kind, model = _parse(config)
    except ConfigError as exc:
        return (ERROR, [payload_term(issue) for issue in exc.to_terms()])
    unanswerable: list[Any] = getattr(model, "subscriber_issues", list)() if reply_to is None else []
    if unanswerable:
        return (ERROR, [payload_term(issue) for issue in ConfigError(unanswerable).to_terms()])
    try:
        job_id = rt.manager.submit(kind, model, reply_to)
    except RuntimeError:
        return (ERROR, Atom("shutting_down"))
    return (OK, job_id)


def status(rt: Runtime, job_id: Any) -> Any:
    """The job's status map (state, kind, step, total_steps, metrics, outputs...) or ``{error, not_found}``."""
    found = rt.manager.status(job_id_arg(job_id, "status/1"))
    return payload_term(found) if found is not None else (ERROR, NOT_FOUND)


def jobs(rt: Runtime) -> list[Any]:
    """Status maps of every job this worker has seen, in submission order."""
    return [payload_term(s) for s in rt.manager.jobs()]


def cancel(rt: Runtime, job_id: Any) -> Any:
    """``ok`` (cooperative: the job stops at its next step boundary) or ``{error, not_found}``."""
    return OK if rt.manager.cancel(job_id_arg(job_id, "cancel/1")) else (ERROR, NOT_FOUND)


def rewards(rt: Runtime, job_id: Any, request: Any, values: Any) -> Any:
    """``ok``: the answer to a job's ``reward_request`` (one number, or nil, per completion, in
    order), or ``{error, not_found}`` when no such request waits (answered, timed out, never sent)."""
    job = job_id_arg(job_id, "rewards/3")
    if isinstance(request, bool) or not isinstance(request, int):
        raise CallError(f"rewards/3: Request must be the request's integer, got {_describe(request)}")
    if not isinstance(values, list):
        raise CallError(f"rewards/3: Rewards must be a list of numbers, got {_describe(values)}")
    problem = rt.manager.answer(job, request, values)
    if problem == "not_found":
        return (ERROR, NOT_FOUND)
    if problem is not None:
        raise CallError(f"rewards/3: {problem}")
    return OK


def shutdown(rt: Runtime) -> Atom:
    """``ok``; once the reply is written the worker cancels its job and exits (grace period applies)."""
    rt.shutdown_requested.set()
    return OK


# ---- argument conversion ---------------------------------------------------------------------


def _parse(config: Any) -> tuple[str, Any]:
    # Imported here: pydantic and the config models cost a few hundred ms, and `info`
    # must answer right after spawn.
    from finetune_worker.config import parse_job_config

    return parse_job_config(config_form(config))


def config_form(config: Any) -> Any:
    """Turn the wire forms of a config into what :func:`parse_job_config` reads: the one place
    that knows them, so no form can skip the checks ``parse_job_config`` makes.

    JSON binary -> str (always the document itself, never a file name), map (atom or binary
    keys) -> dict with str keys all the way down, ``{file, Path}`` -> ``("file", path)`` (read,
    confined to the allowed roots, by :func:`finetune_worker.config.read_config_file`).
    Anything else is a call error.
    """
    if isinstance(config, (str, bytes)):
        return config
    if isinstance(config, dict):
        return _plain(config, "")
    if isinstance(config, tuple) and len(config) == 2 and isinstance(config[0], Atom) and config[0] == "file":
        path = config[1]
        if isinstance(path, list) and all(isinstance(c, int) for c in path):
            path = "".join(map(chr, path))  # an Erlang charlist path
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if not isinstance(path, str):
            raise CallError(f"{{file, Path}}: Path must be a binary or a charlist, got {_describe(path)}")
        return ("file", path)
    raise CallError(f"Config must be a JSON binary, a map or {{file, Path}}, got {_describe(config)}")


def _plain(value: Any, path: str) -> Any:
    """A decoded map term as plain JSON-like Python values; ``path`` names the place of a bad value."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            name = _key(key, path)
            out[name] = _plain(item, f"{path}.{name}" if path else name)
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(item, f"{path}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, Atom):
        return str(value)  # `:auto` from Elixir means "auto"
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError([ConfigIssue(path, "binary is not UTF-8 text")]) from None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise ConfigError([ConfigIssue(path, f"{type(value).__name__} has no JSON equivalent")])


def _key(key: Any, path: str) -> str:
    if isinstance(key, str):  # Atom is a str too
        return str(key)
    if isinstance(key, bytes):
        try:
            return key.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError([ConfigIssue(path, "map key is not UTF-8 text")]) from None
    raise ConfigError([ConfigIssue(path, f"map keys must be atoms or binaries, got {_describe(key)}")])


def job_id_arg(value: Any, where: str) -> str:
    """A ``JobId`` argument (a binary) as ``str``; a CallError naming ``where`` otherwise."""
    if isinstance(value, str) and not isinstance(value, Atom):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    raise CallError(f"{where}: JobId must be a binary, got {_describe(value)}")


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {brief(value, 60)}"


# ---- info helpers ----------------------------------------------------------------------------


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _devices() -> list[dict[str, Any]]:
    """GPUs once a job has imported torch (never imported here); the CPU always."""
    devices: list[dict[str, Any]] = []
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None) if torch is not None else None
    if cuda is not None:
        try:  # torch may be half-imported by the runner right now; then we report the CPU only
            count = cuda.device_count() if cuda.is_available() else 0
            # Device properties would create a CUDA context on this thread (memory, seconds);
            # ask for them only once a job has initialized CUDA anyway.
            detailed = cuda.is_initialized()
            for i in range(count):
                entry: dict[str, Any] = {"type": "cuda", "index": i}
                if detailed:
                    props = cuda.get_device_properties(i)
                    entry.update(name=props.name, memory_bytes=props.total_memory)
                devices.append(entry)
        except Exception:
            devices = []
    devices.append(
        {"type": "cpu", "name": platform.machine(), "cores": os.cpu_count(), "memory_bytes": _ram()}
    )
    return devices


def _ram() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
