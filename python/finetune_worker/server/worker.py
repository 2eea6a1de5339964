"""The worker process: read a frame, decode it, dispatch it, answer, repeat.

The main thread only reads, decodes and dispatches; every call returns at once (``submit``
queues, the :class:`~finetune_worker.server.jobs.JobManager` runner thread trains). All frames go out
through :meth:`Port.send`, whose one lock keeps replies and events from interleaving.

Messages (docs/protocol.md, "Messages"):

- ``{'C', Id, finetune_worker, Function, Args}``: a call of :mod:`finetune_worker.server.api`; the
  reply is ``{'r', Id, Result}`` or ``{'e', Id, {python, Class, Message, Trace}}``.
- ``{'M', Message}``: a cast; ``{cancel, JobId}`` is understood, anything else is logged.
- Job events go to the job's ``ReplyTo`` pid as ``{'M', Pid, Event}`` (ErlPort: ``Pid ! Event``).

ErlPort's Erlang client wraps every pid, reference, port and fun it sends as
``{'$erlport.opaque', erlang, Bin}`` (``erlport_utils:prepare_term/1``; ``Bin`` is the term's
external format without the version byte). Call arguments and casts are unwrapped before the
API sees them, so ``submit(Cfg, self())`` from ErlPort names a real pid, and events sent back to
it are the plain pid ErlPort's ``Pid ! Message`` expects.

Nothing the peer sends can make the worker import or run anything outside the API: module and
function names are compared with fixed lists, never resolved. Every call gets an answer: a call
frame whose arguments do not decode (map keys that collide in Python, say) is answered with a
``ProtocolError`` reply to its ``Id``, read from the frame's first bytes and echoed back as it
came. Only a frame from which no ``Id`` can be read goes unanswered, with a warning on stderr;
either way the worker goes on serving. Peer terms are only ever rendered through
:func:`~finetune_worker.errors.brief`, which is bounded and cannot raise.

Shutdown (stdin EOF, SIGTERM, or the ``shutdown`` call): cancel the running job, give it
``grace_s`` to save, and exit. A watchdog ``os._exit``\\s shortly after the grace period, so the
process is gone even if the job ignores the cancel or a write blocks on a peer that stopped
reading: no orphan may keep a GPU busy. A clean exit runs the exit hooks, then skips the
interpreter's finalization (``serve``).
"""

from __future__ import annotations

import atexit
import contextlib
import inspect
import logging
import os
import signal
import sys
import threading
import traceback
from typing import Any, NoReturn

from finetune_worker.errors import (
    WIRE_ERROR_CLASSES,
    CallError,
    InternalError,
    ProtocolError,
    brief,
    wire_class_name,
)
from finetune_worker.server import api
from finetune_worker.server.jobs import JobManager, JobRecord
from finetune_worker.server.warmup import Warmup
from finetune_worker.wire import (
    DEFAULT_MAX_DEPTH,
    Atom,
    ETFDecodeError,
    Pid,
    RawTerm,
    decode,
    recover_call_id,
)
from finetune_worker.wire.port import FrameTooLarge, Port, PortClosed
from finetune_worker.wire.vocabulary import Event

log = logging.getLogger("finetune_worker.server.worker")

#: Names the peer sends as atoms; compared as text (Atom is a str), never sent back.
API_MODULE = "finetune_worker"

#: The only classes an ``'e'`` reply names: the BEAM side decodes with ``[safe]`` and has
#: declared exactly these atoms.
ERROR_CLASSES: dict[type[BaseException], Atom] = {c: Atom(wire_class_name(c)) for c in WIRE_ERROR_CLASSES}

#: ErlPort's wrapper of a pid, reference, port or fun: ``{'$erlport.opaque', erlang, Bin}``.
OPAQUE_TAG = "$erlport.opaque"
OPAQUE_LANGUAGE = "erlang"

#: Seconds the watchdog allows beyond the grace period (the process must be gone by grace + 2 s).
EXIT_SLACK_S = 1.5
#: The warm-up starts after the first reply, or this long after start when no call comes first.
WARM_AFTER_S = 0.5


class _Terminate(BaseException):
    """Raised by the SIGTERM handler to break out of a blocking read."""


class Worker:
    """One port, one job manager, one dispatch loop. Call :meth:`serve` on the main thread."""

    def __init__(
        self, port: Port, *, grace_s: float = 10.0, max_depth: int = DEFAULT_MAX_DEPTH, warm: bool = False
    ):
        self.port = port
        self.grace_s = grace_s
        self.max_depth = max_depth
        warmup = Warmup(warm)
        self.manager = JobManager(self._deliver, before_job=warmup.before_job)
        self.runtime = api.Runtime(manager=self.manager, warmup=warmup)
        self._terminating = False
        self._reading = False
        self._watchdog: threading.Timer | None = None
        self._output_closed = False
        self._frames = 0
        self._offset = 0  # stream offset of the next frame, for warnings that locate a bad frame

    # ---- loop ----------------------------------------------------------------------------------

    def serve(self) -> int:
        """Serve until EOF, SIGTERM or ``shutdown()``; then shut down. Returns the exit status."""
        # The handler stays through the shutdown too: a second SIGTERM then changes nothing,
        # the grace period and the watchdog still bound the exit.
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        # A Ctrl-C in the BEAM's terminal reaches the whole process group; the BEAM owns our
        # lifetime (it closes stdin), so SIGINT must not kill a training run behind its back.
        previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            try:
                reason = self._loop()
            except _Terminate:  # the signal landed just after a read returned
                reason = "SIGTERM"
            return self.shutdown(reason)
        finally:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
            signal.signal(signal.SIGINT, previous_int if previous_int is not None else signal.SIG_DFL)

    def _loop(self) -> str:
        # Or half a second after start when no call comes: a worker started ahead of its jobs.
        timer = threading.Timer(WARM_AFTER_S, self.runtime.warmup.start)
        timer.daemon = True
        timer.start()
        while not self._terminating:
            try:
                self._reading = True
                frame = self.port.read_frame()
            except FrameTooLarge as exc:
                log.warning("frame #%d at stream offset %d dropped: %s", self._frames + 1, self._offset, exc)
                self._frames += 1
                self._offset += self.port.packet + exc.size
                continue
            except _Terminate:
                return "SIGTERM"
            except ProtocolError as exc:  # a truncated last frame; the next read reports EOF
                log.warning("frame #%d at stream offset %d: %s", self._frames + 1, self._offset, exc)
                continue
            except (PortClosed, OSError) as exc:
                return f"input closed ({exc})"
            finally:
                self._reading = False
            if frame is None:
                return "stdin EOF"
            self._frames += 1
            offset, self._offset = self._offset, self._offset + self.port.packet + len(frame)
            try:
                self.handle_frame(frame, offset)
            except (PortClosed, BrokenPipeError) as exc:
                return f"output closed ({exc})"
            # After the first reply (the BEAM's readiness `info`), so the import never delays it.
            self.runtime.warmup.start()
            if self.runtime.shutdown_requested.is_set():
                return "shutdown() call"
        return "SIGTERM"

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self._terminating = True
        # Only interrupt a read: raising while a reply is half written would corrupt the stream.
        if self._reading:
            raise _Terminate
        # Not reading: a write may be blocked on a peer that stopped reading, and the loop may
        # never get back to check the flag; the deadline must hold anyway.
        self._start_watchdog()

    def _start_watchdog(self) -> None:
        if self._watchdog is None:
            self._watchdog = threading.Timer(self.grace_s + EXIT_SLACK_S, _hard_exit, args=(self.grace_s,))
            self._watchdog.daemon = True
            self._watchdog.start()

    def shutdown(self, reason: str) -> int:
        """Cancel everything, wait up to ``grace_s`` for the running job, then return 0.

        If the job outlives the grace period the watchdog ends the process; the caller
        should ``os._exit`` when :attr:`runner_alive` is still true, because a daemon thread
        stuck in native code can hang interpreter finalization.
        """
        log.info("shutting down (%s); grace period %.1f s", reason, self.grace_s)
        self._start_watchdog()
        if not self.manager.close(self.grace_s):
            log.warning(
                "the running job did not stop within %.1f s of its cancel; exiting anyway", self.grace_s
            )
        with contextlib.suppress(OSError):
            self.port.close()
        return 0

    @property
    def runner_alive(self) -> bool:
        """After :meth:`shutdown`: whether the runner thread is still busy (a job that ignored its
        cancel, or native code that did not return)."""
        return self.manager.runner_busy()

    # ---- one frame -----------------------------------------------------------------------------

    def handle_frame(self, frame: bytes, offset: int = 0) -> None:
        where = f"frame #{self._frames} at stream offset {offset} ({len(frame)} bytes)"
        try:
            term = decode(frame, max_depth=self.max_depth)
        except ETFDecodeError as exc:
            call_id = recover_call_id(frame)
            if call_id is None:
                log.warning("%s ignored: not a valid term: %s", where, exc)
                return
            log.warning("%s: a call whose arguments do not decode: %s", where, exc)
            self._reply_error(call_id, ProtocolError(f"the call's terms could not be decoded: {exc}"), frame)
            return
        if not isinstance(term, tuple) or not term or not isinstance(term[0], Atom):
            log.warning("%s ignored: expected {'C', ...} or {'M', ...}, got %s", where, brief(term))
            return
        tag = term[0]
        if tag == "C":
            self._call(term, where, frame)
        elif tag == "M" and len(term) == 2:
            self._cast(term[1], where)
        else:
            log.warning("%s ignored: unknown message %s", where, brief(term))

    def _call(self, term: tuple[Any, ...], where: str, frame: bytes = b"") -> None:
        if len(term) < 2:
            log.warning("%s ignored: a call without an Id", where)
            return
        call_id = term[1]
        try:
            if len(term) != 5:
                raise ProtocolError(f"a call is {{'C', Id, Module, Function, Args}}; got a {len(term)}-tuple")
            result = self.dispatch(term[2], term[3], unwrap_opaque(term[4]))
        except BaseException as exc:  # every failure of a call becomes its error reply
            if isinstance(exc, (KeyboardInterrupt, SystemExit, _Terminate)):
                raise
            self._reply_error(call_id, exc, frame)
            return
        try:
            self._send_reply((Atom("r"), call_id, result), frame)
        except (TypeError, ValueError) as exc:  # a result the codec cannot carry is our bug
            self._reply_error(call_id, InternalError(f"cannot encode the result: {exc}"), frame)

    def _send_reply(self, reply: tuple[Any, ...], frame: bytes) -> None:
        """Send ``{'r'|'e', Id, ...}``; an ``Id`` Python cannot re-encode (NaN) goes back as it came."""
        try:
            self.port.send(reply)
        except ValueError as exc:
            raw_id = recover_call_id(frame) if frame else None
            if raw_id is None or isinstance(reply[1], RawTerm):
                raise
            try:
                self.port.send((reply[0], raw_id, *reply[2:]))
            except (TypeError, ValueError):
                raise exc from None

    def dispatch(self, module: Any, function: Any, args: Any) -> Any:
        """Run one API call; raise CallError for anything outside the API. Never imports by name."""
        if not (isinstance(module, Atom) and module == API_MODULE):
            raise CallError(f"module {brief(module)} is not callable; only {API_MODULE} is")
        if not (isinstance(function, Atom) and function in api.__all__):
            raise CallError(
                f"{API_MODULE} has no function {brief(function)}; it has {', '.join(api.__all__)}"
            )
        if not isinstance(args, list):
            raise CallError(f"Args must be a list, got {brief(args)}")
        func = getattr(api, str(function))
        try:
            inspect.signature(func).bind(self.runtime, *args)
        except TypeError:
            arities = _arities(func)
            raise CallError(f"{API_MODULE}:{function} takes {arities} argument(s), got {len(args)}") from None
        return func(self.runtime, *args)

    def _cast(self, message: Any, where: str) -> None:
        message = unwrap_opaque(message)
        if isinstance(message, tuple) and len(message) == 2 and _atom(message[0], "cancel"):
            try:
                job_id = api.job_id_arg(message[1], "cancel cast")
            except CallError as exc:
                log.warning("%s ignored: %s", where, exc)
                return
            if not self.manager.cancel(job_id):
                log.warning("cancel cast for unknown job %s", brief(job_id))
            return
        log.warning("%s ignored: unknown cast %s", where, brief(message))

    def _reply_error(self, call_id: Any, exc: BaseException, frame: bytes = b"") -> None:
        cls = next((atom for kind, atom in ERROR_CLASSES.items() if isinstance(exc, kind)), None)
        if cls is not None:
            message = str(exc)
            trace = ""
        else:
            log.error("call %s failed:\n%s", brief(call_id), "".join(traceback.format_exception(exc)))
            cls = ERROR_CLASSES[InternalError]
            message = f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}"
            trace = "".join(traceback.format_exception(exc))
        try:
            self._send_reply((Atom("e"), call_id, (Atom("python"), cls, message, trace)), frame)
        except (TypeError, ValueError):  # an Id we cannot echo back, not even as its raw bytes
            log.warning("cannot send the error reply to call %s: %s", brief(call_id), brief(message, 400))

    # ---- events --------------------------------------------------------------------------------

    def _deliver(self, record: JobRecord, event: Event) -> None:
        """JobManager sink: ``{'M', Pid, Event}`` to the job's subscriber, if it has one."""
        if not isinstance(record.reply_to, Pid):
            return
        try:
            self.port.send((Atom("M"), record.reply_to, event.to_term()))
        except PortClosed:
            # The BEAM is gone; the job still runs to its cancel. Say so once, not per event.
            if not self._output_closed:
                self._output_closed = True
                log.warning("output closed; events of job %s and later ones are dropped", record.job_id)


def unwrap_opaque(term: Any) -> Any:
    """``term`` with every ErlPort ``{'$erlport.opaque', erlang, Bin}`` replaced by the term ``Bin`` encodes.

    ``Bin`` arrives as ``str`` when its bytes happen to be valid UTF-8; encoding it back gives the
    same bytes. A wrapper whose bytes do not decode is left as it is (the API then names it).
    """
    if isinstance(term, tuple):
        if len(term) == 3 and _atom(term[0], OPAQUE_TAG) and _atom(term[1], OPAQUE_LANGUAGE):
            raw = term[2].encode("utf-8") if isinstance(term[2], str) else term[2]
            if isinstance(raw, bytes):
                try:
                    return decode(b"\x83" + raw)
                except ETFDecodeError:
                    return term
        return tuple(unwrap_opaque(t) for t in term)
    if isinstance(term, list):
        return [unwrap_opaque(t) for t in term]
    if isinstance(term, dict):
        return {unwrap_opaque(k): unwrap_opaque(v) for k, v in term.items()}
    return term


def _atom(value: Any, name: str) -> bool:
    return isinstance(value, Atom) and value == name


def _arities(func: Any) -> str:
    params = list(inspect.signature(func).parameters.values())[1:]  # the first is the Runtime
    required = sum(1 for p in params if p.default is inspect.Parameter.empty)
    return str(required) if required == len(params) else f"{required} to {len(params)}"


def _hard_exit(grace_s: float) -> None:
    log.warning("still alive %.1f s after the shutdown began; exiting now", grace_s + EXIT_SLACK_S)
    exit_process(0, hooks=False)


def serve(port: Port, *, grace_s: float = 10.0, warm: bool = False) -> NoReturn:
    """Run a worker on ``port`` until shutdown; the process exits right after (see module doc).
    ``warm``: import the training stack in the background (:mod:`finetune_worker.server.warmup`)."""
    worker = Worker(port, grace_s=grace_s, warm=warm)
    code = worker.serve()
    # Not with a job still running: an exit hook can wait on it, and a daemon thread stuck in
    # native code can hang finalization.
    exit_process(code, hooks=not worker.runner_alive)


def exit_process(code: int, *, hooks: bool = True) -> NoReturn:
    """End the process as a normal exit would, minus the interpreter's finalization.

    ``hooks``: first run what a normal exit runs, the libraries' exit hooks (tracking clients,
    temporary folders). Finalization, tearing torch and transformers down module by module, took
    ~1.5 s here after every job's end, a supervisor's restart waiting on it, with nothing left to
    write (the port is closed, the jobs are over)."""
    if hooks:
        atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)
