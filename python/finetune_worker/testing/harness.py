"""A harness that plays the BEAM's side of the port, for tests and experiments.

:class:`WorkerHarness` spawns the real worker process, frames and encodes terms the way
ErlPort's Erlang side does, and routes what comes back: ``'r'``/``'e'`` replies by call id,
``{fine_tuning, JobId, Type, Payload}`` events into per-job streams, anything else into
:attr:`WorkerHarness.messages`. It fabricates realistic pids and references
(NEW_PID_EXT / NEWER_REFERENCE_EXT) to stand in for BEAM processes, and captures the
worker's stderr for assertions. Its framing is written independently of
:mod:`finetune_worker.wire.port`, so the two check each other.

Example::

    from finetune_worker.testing import WorkerHarness

    with WorkerHarness(test_jobs=True) as w:
        assert w.call("ping") == "pong"
        ok, job_id = w.call("submit", '{"job": "test_steps", "steps": 3}', w.pid)
        events = w.wait_for(job_id, "terminal", timeout=30)
        assert [e.type for e in events][-1] == "completed"
        w.close_stdin()
        assert w.wait(timeout=15) == 0
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from finetune_worker.wire import Atom, ETFDecodeError, Pid, Reference, decode, decode_opaque, encode
from finetune_worker.wire.vocabulary import TERMINAL_TYPES

__all__ = ["HarnessEvent", "RemoteError", "Reply", "WorkerHarness", "make_pid", "make_ref"]

_SMALL_ATOM_UTF8 = 119
_NEW_PID = 88
_NEWER_REFERENCE = 90
_serials = itertools.count(1)


def _atom_bytes(name: str) -> bytes:
    raw = name.encode("utf-8")
    return bytes([_SMALL_ATOM_UTF8, len(raw)]) + raw


def make_pid(node: str = "harness@127.0.0.1", number: int | None = None, creation: int = 1700000000) -> Pid:
    """A pid as OTP 23+ encodes it (NEW_PID_EXT): ``<<88, Node/atom, ID:32, Serial:32, Creation:32>>``."""
    number = next(_serials) + 80 if number is None else number
    raw = bytes([_NEW_PID]) + _atom_bytes(node) + struct.pack(">III", number & 0x7FFF, 0, creation)
    pid: Pid = decode_opaque(Pid, raw)
    return pid


def make_ref(node: str = "harness@127.0.0.1", creation: int = 1700000000) -> Reference:
    """A reference as OTP 23+ encodes it (NEWER_REFERENCE_EXT, three 32-bit ids)."""
    n = next(_serials)
    ids = (n & 0x3FFFF, (n * 2654435761) & 0xFFFFFFFF, 0x5EED)
    raw = (
        bytes([_NEWER_REFERENCE])
        + struct.pack(">H", 3)
        + _atom_bytes(node)
        + struct.pack(">IIII", creation, *ids)
    )
    ref: Reference = decode_opaque(Reference, raw)
    return ref


def _plain(value: Any) -> Any:
    """A decoded term with atom keys/values as plain ``str`` (bools and None stay as they are)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, Atom):
        return str(value)
    return value


@dataclass(frozen=True)
class HarnessEvent:
    """One ``{fine_tuning, JobId, Type, Payload}`` event, with plain ``str`` keys and atom values."""

    job_id: str
    type: str
    payload: dict[str, Any]
    to: Any = None  # the pid the worker addressed it to
    term: Any = field(default=None, repr=False)  # the event exactly as decoded

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_TYPES


class RemoteError(Exception):
    """An ``{'e', Id, {python, Class, Message, Trace}}`` reply."""

    def __init__(self, cls: str, message: str, trace: Any, call_id: Any = None):
        self.cls = cls
        self.message = message
        self.trace = trace
        self.call_id = call_id
        super().__init__(f"{cls}: {message}")


@dataclass(frozen=True)
class Reply:
    """What came back for one call id: ``ok`` with ``value``, or ``error`` (a RemoteError)."""

    call_id: Any
    ok: bool
    value: Any = None
    error: RemoteError | None = None
    term: Any = field(default=None, repr=False)  # the reply exactly as decoded (atoms kept)


class WorkerHarness:
    """Spawn a worker and talk to it as the BEAM would. Always use it as a context manager.

    ``args`` are appended to the default command (``python -m finetune_worker port --packet N``);
    ``command`` replaces the command entirely (then ``args`` are appended to it). ``test_jobs``
    sets ``FINETUNE_WORKER_TEST_JOBS=1`` so the test-only ``test_steps`` kind exists.
    """

    def __init__(
        self,
        args: Sequence[str] = (),
        *,
        command: Sequence[str] | None = None,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        packet: int = 4,
        test_jobs: bool = False,
    ):
        if packet not in (1, 2, 4):
            raise ValueError("packet must be 1, 2 or 4")
        self.packet = packet
        base = list(command) if command is not None else [sys.executable, "-m", "finetune_worker", "port"]
        if command is None and packet != 4:
            base += ["--packet", str(packet)]
        self.command = [*base, *args]
        full_env = dict(os.environ if env is None else env)
        if test_jobs:
            full_env["FINETUNE_WORKER_TEST_JOBS"] = "1"
        # A file, not a pipe: nobody has to drain it, and it survives the process for assertions.
        self._stderr_file = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in close()
            prefix="worker-stderr-", suffix=".log", delete=False
        )
        self.stderr_path = self._stderr_file.name
        self.proc = subprocess.Popen(
            self.command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr_file,
            env=full_env,
            cwd=cwd,
            bufsize=0,
        )
        self.pid = make_pid()  # the default subscriber for events (stands for the test process)
        self.messages: list[Any] = []  # {'M', Pid, Msg} that are not job events, as (pid, msg)
        self.prints: list[Any] = []  # {'P', Text}
        self.stray: list[str] = []  # frames that did not decode or had an unknown shape
        self.event_log: list[HarnessEvent] = []  # every job event, in arrival order
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._replies: dict[Any, Reply] = {}
        self._events: dict[str, list[HarnessEvent]] = {}
        self._cursors: dict[str, int] = {}
        self._eof = False
        self._write_lock = threading.Lock()
        self._reader = threading.Thread(target=self._read_loop, name="harness-reader", daemon=True)
        self._reader.start()

    make_pid = staticmethod(make_pid)
    make_ref = staticmethod(make_ref)

    # ---- sending -------------------------------------------------------------------------------

    def send_bytes(self, data: bytes) -> None:
        """Write raw bytes to the worker's stdin, no framing (for torn or hostile frames)."""
        with self._write_lock:
            assert self.proc.stdin is not None
            self.proc.stdin.write(data)
            self.proc.stdin.flush()

    def send_frame(self, payload: bytes) -> None:
        """Write one frame with ``payload`` as is (it need not be a valid term)."""
        self.send_bytes(len(payload).to_bytes(self.packet, "big") + payload)

    def send_term(self, term: Any) -> None:
        self.send_frame(encode(term))

    def next_id(self) -> int:
        return next(self._ids)

    def call(
        self,
        function: str,
        *args: Any,
        timeout: float = 10,
        module: str = "finetune_worker",
        call_id: Any = None,
    ) -> Any:
        """Call ``module:function(args)`` and return the result; raise :class:`RemoteError` on ``'e'``.

        ``call_id`` replaces the next integer id (say, a fresh :func:`make_ref` when other frames
        sent to the worker may carry the same small integers).
        """
        call_id = self.next_id() if call_id is None else call_id
        self.send_term((Atom("C"), call_id, Atom(module), Atom(function), list(args)))
        reply = self.wait_reply(call_id, timeout)
        if not reply.ok:
            assert reply.error is not None
            raise reply.error
        return reply.value

    def call_raw(self, data: Any, *, expect_id: Any = None, timeout: float = 10) -> Reply | None:
        """Send ``data`` (bytes: a frame payload as is; else a term to encode); wait for ``expect_id``'s reply."""
        if isinstance(data, (bytes, bytearray)):
            self.send_frame(bytes(data))
        else:
            self.send_term(data)
        return None if expect_id is None else self.wait_reply(expect_id, timeout)

    def cast(self, message: Any) -> None:
        """``{'M', Message}``, what ``python:cast/2`` sends."""
        self.send_term((Atom("M"), message))

    def submit_and_wait(
        self, config: Any, *, timeout: float = 60, reply_to: Any = None
    ) -> list[HarnessEvent]:
        """Submit ``config`` with events to ``reply_to`` (default :attr:`pid`); return its events up to the terminal one."""
        result = self.call("submit", config, self.pid if reply_to is None else reply_to)
        if not (isinstance(result, tuple) and result[0] == "ok"):
            raise AssertionError(f"submit refused: {result!r}")
        return self.wait_for(str(result[1]), "terminal", timeout=timeout)

    # ---- receiving -----------------------------------------------------------------------------

    def wait_reply(self, call_id: Any, timeout: float = 10) -> Reply:
        deadline = time.monotonic() + timeout
        key = _id_key(call_id)
        with self._cond:
            while key not in self._replies:
                left = deadline - time.monotonic()
                if self._eof:
                    raise ConnectionError(f"worker closed its output before answering call {call_id!r}")
                if left <= 0:
                    raise TimeoutError(f"no reply to call {call_id!r} within {timeout} s")
                self._cond.wait(left)
            return self._replies.pop(key)

    def events(self, job_id: str) -> list[HarnessEvent]:
        """Every event of ``job_id`` received so far (does not consume)."""
        with self._cond:
            return list(self._events.get(job_id, ()))

    def next_event(self, job_id: str, timeout: float = 10) -> HarnessEvent:
        """The next not yet consumed event of ``job_id``; TimeoutError if none arrives in time."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                seen = self._events.get(job_id, [])
                cursor = self._cursors.get(job_id, 0)
                if cursor < len(seen):
                    self._cursors[job_id] = cursor + 1
                    return seen[cursor]
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    raise TimeoutError(f"no further event of job {job_id} within {timeout} s")
                self._cond.wait(left)

    def wait_for(
        self, job_id: str, type: str | Iterable[str] = "terminal", timeout: float = 30
    ) -> list[HarnessEvent]:
        """Consume events of ``job_id`` until one of ``type`` ("terminal" = completed/failed/cancelled).

        Returns the events consumed, the matching one last. On timeout the TimeoutError names
        the types seen.
        """
        wanted = (
            set(TERMINAL_TYPES) if type == "terminal" else ({type} if isinstance(type, str) else set(type))
        )
        deadline = time.monotonic() + timeout
        seen: list[HarnessEvent] = []
        while True:
            try:
                event = self.next_event(job_id, max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise TimeoutError(
                    f"job {job_id}: no {sorted(wanted)} event within {timeout} s; saw {[e.type for e in seen]}"
                ) from None
            seen.append(event)
            if event.type in wanted:
                return seen

    def _read_exact(self, fd: int, n: int) -> bytes | None:
        chunks: list[bytes] = []
        while n:
            chunk = os.read(fd, min(n, 1 << 20))
            if not chunk:
                return None
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def _read_loop(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        try:
            while True:
                header = self._read_exact(fd, self.packet)
                if header is None:
                    break
                payload = self._read_exact(fd, int.from_bytes(header, "big"))
                if payload is None:
                    self._note_stray(f"EOF inside a frame of {int.from_bytes(header, 'big')} bytes")
                    break
                try:
                    self._route(payload)
                except Exception as exc:  # a harness bug must show up in a test, not hang it
                    self._note_stray(f"could not route a frame: {exc!r}")
        except OSError as exc:
            self._note_stray(f"read error: {exc}")
        finally:
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    def _note_stray(self, what: str) -> None:
        with self._cond:
            self.stray.append(what)
            self._cond.notify_all()

    def _route(self, payload: bytes) -> None:
        try:
            term = decode(payload)
        except ETFDecodeError as exc:
            self._note_stray(f"undecodable frame ({len(payload)} bytes): {exc}")
            return
        with self._cond:
            if _is(term, "r", 3):
                self._replies[_id_key(term[1])] = Reply(term[1], True, _plain(term[2]), term=term)
            elif _is(term, "e", 3):
                err = term[2]
                if isinstance(err, tuple) and len(err) == 4:
                    error = RemoteError(str(err[1]), str(err[2]), err[3], term[1])
                else:
                    error = RemoteError("?", repr(err), None, term[1])
                self._replies[_id_key(term[1])] = Reply(term[1], False, error=error, term=term)
            elif _is(term, "M", 3):
                msg = term[2]
                if _is(msg, "fine_tuning", 4):
                    job_id = str(msg[1])
                    event = HarnessEvent(job_id, str(msg[2]), _plain(msg[3]), term[1], msg)
                    self._events.setdefault(job_id, []).append(event)
                    self.event_log.append(event)
                else:
                    self.messages.append((term[1], msg))
            elif _is(term, "P", 2):
                self.prints.append(term[1])
            else:
                self.stray.append(f"unexpected term {term!r:.200}")
            self._cond.notify_all()

    # ---- the process ---------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def stderr_text(self) -> str:
        """Everything the worker wrote to stderr so far."""
        with open(self.stderr_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def close_stdin(self) -> None:
        """EOF on the worker's input: what the BEAM closing the port looks like."""
        with self._write_lock:
            if self.proc.stdin is not None and not self.proc.stdin.closed:
                self.proc.stdin.close()

    def terminate(self) -> None:
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.alive:
            self.proc.kill()

    def wait(self, timeout: float = 15) -> int:
        """The exit status; TimeoutError (process left running) if it does not exit in time."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"worker pid {self.proc.pid} still running after {timeout} s") from None

    def close(self) -> None:
        """Kill the worker if still running and release everything (idempotent)."""
        self.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self.close_stdin()
        self._reader.join(timeout=5)  # the pipe reports EOF once the process is gone
        if self.proc.stdout is not None and not self._reader.is_alive():
            self.proc.stdout.close()
        self._stderr_file.close()

    def __enter__(self) -> WorkerHarness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        with contextlib.suppress(OSError):
            os.unlink(self.stderr_path)


def _id_key(call_id: Any) -> Any:
    """Call ids may be any term, maps and lists included; those are keyed by their repr (and a
    NaN float, which equals nothing, by its name)."""
    if isinstance(call_id, float) and call_id != call_id:
        return ("nan id",)
    try:
        hash(call_id)
    except TypeError:
        return ("unhashable id", repr(call_id))
    return call_id


def _is(term: Any, tag: str, size: int) -> bool:
    return isinstance(term, tuple) and len(term) == size and isinstance(term[0], Atom) and term[0] == tag
