"""Erlang port framing over file descriptors: ``{packet, N}`` frames in and out, ETF terms inside.

The codec (:mod:`finetune_worker.wire`) never touches IO; this module owns the file descriptors.
Like ErlPort's ``erlproto.Port``: descriptors are passed in (tests use ``os.pipe()``), one
write lock is shared by every thread, writes loop until the whole frame is out, and EOF or
EPIPE surface as :class:`PortClosed` so the worker can end cleanly. Unlike ErlPort, large
frames are read in linear time into a preallocated buffer.

File descriptors must be blocking (pipes as the BEAM opens them are).
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import sys
import threading
from typing import Any

from finetune_worker import wire as etf
from finetune_worker.errors import FinetuneWorkerError, ProtocolError

__all__ = [
    "DEFAULT_BUFFER_SIZE",
    "DEFAULT_MAX_FRAME",
    "FrameTooLarge",
    "Port",
    "PortClosed",
    "open_port",
    "protect_stdin",
    "protect_stdout",
]

#: Largest frame :meth:`Port.read_frame` accepts, in bytes; a bigger length prefix raises
#: :class:`FrameTooLarge`. Big enough for any config or dataset path list, small enough that a
#: corrupted length prefix cannot make the worker allocate gigabytes.
DEFAULT_MAX_FRAME = 512 * 1024 * 1024
#: How much one read from the input fd may fetch; many small frames then cost one syscall.
DEFAULT_BUFFER_SIZE = 65536

_PACKET_SIZES = (1, 2, 4)
# errnos that mean the other end is gone, not that we did something wrong.
_CLOSED_ERRNOS = frozenset({errno.EPIPE, errno.EBADF, errno.ECONNRESET, errno.EINVAL})


class PortClosed(FinetuneWorkerError):
    """The frame stream ended: EOF on input, or EPIPE/EBADF on output."""


class FrameTooLarge(ProtocolError):
    """A length prefix over ``max_frame_size``; the frame's bytes were skipped, so the stream stays in sync."""

    def __init__(self, size: int, limit: int):
        self.size = size
        self.limit = limit
        super().__init__(f"frame of {size} bytes exceeds max_frame_size={limit}; skipped")


class Port:
    """A ``{packet, N}`` frame stream over two file descriptors, which it owns (see :meth:`close`)."""

    def __init__(
        self,
        in_fd: int,
        out_fd: int,
        *,
        packet: int = 4,
        compressed: int = 0,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        max_frame_size: int = DEFAULT_MAX_FRAME,
    ):
        if packet not in _PACKET_SIZES:
            raise ValueError(f"packet must be 1, 2 or 4, got {packet!r}")
        if not 0 <= compressed <= 9:
            raise ValueError(f"compressed must be 0..9, got {compressed!r}")
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be positive, got {buffer_size!r}")
        if max_frame_size < 0:
            raise ValueError(f"max_frame_size must be >= 0, got {max_frame_size!r}")
        self.in_fd = in_fd
        self.out_fd = out_fd
        self.packet = packet
        self.compressed = compressed
        self.buffer_size = buffer_size
        self.max_frame_size = max_frame_size
        self.max_payload = 2 ** (8 * packet) - 1
        self._buf = bytearray(buffer_size)
        self._view = memoryview(self._buf)
        self._start = 0  # unread bytes are self._buf[self._start:self._end]
        self._end = 0
        self._eof = False
        self._write_closed = False
        self._read_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._closed = False

    # -- reading -------------------------------------------------------------------------------

    def _fill(self) -> int:
        """Read whatever is available (up to buffer_size) into the empty buffer; 0 means EOF."""
        try:
            n = os.readv(self.in_fd, [self._view])
        except OSError as exc:
            if exc.errno in _CLOSED_ERRNOS:
                n = 0  # a reset or closed input is the end of the stream, like EOF
            else:
                raise
        self._start, self._end = 0, n
        return n

    def _read_into(self, dest: memoryview) -> int:
        """Fill ``dest`` from the buffer, then from the fd; returns how many bytes arrived before EOF."""
        want = len(dest)
        got = min(want, self._end - self._start)
        if got:
            dest[:got] = self._view[self._start : self._start + got]
            self._start += got
        while got < want:
            if want - got >= self.buffer_size:
                # Big remainder: read straight into the destination, never past this frame.
                try:
                    n = os.readv(self.in_fd, [dest[got:]])
                except OSError as exc:
                    if exc.errno in _CLOSED_ERRNOS:
                        return got
                    raise
                if n == 0:
                    return got
                got += n
            else:
                if self._fill() == 0:
                    return got
                n = min(want - got, self._end)
                dest[got : got + n] = self._view[:n]
                self._start = n
                got += n
        return got

    def _skip(self, count: int) -> int:
        """Discard ``count`` bytes of input without holding them; returns how many were there."""
        skipped = 0
        while skipped < count:
            if self._start == self._end and self._fill() == 0:
                return skipped
            n = min(count - skipped, self._end - self._start)
            self._start += n
            skipped += n
        return skipped

    def read_frame(self) -> bytes | None:
        """The next frame's payload; ``None`` on clean EOF at a frame boundary.

        EOF inside a frame raises :class:`ProtocolError` ("truncated frame"), and the call after
        that returns ``None``. A length over ``max_frame_size`` raises :class:`FrameTooLarge`
        after skipping the frame, so the next call reads the next frame.
        """
        with self._read_lock:
            if self._eof or self._closed:
                return None
            header = bytearray(self.packet)
            got = self._read_into(memoryview(header))
            if got == 0:
                self._eof = True
                return None
            if got < self.packet:
                self._eof = True
                raise ProtocolError(f"truncated frame: EOF after {got} of {self.packet} length-prefix bytes")
            size = int.from_bytes(header, "big")
            if size > self.max_frame_size:
                skipped = self._skip(size)
                if skipped < size:
                    self._eof = True
                    raise ProtocolError(
                        f"truncated frame: EOF after {skipped} of {size} bytes (an oversized frame being skipped)"
                    )
                raise FrameTooLarge(size, self.max_frame_size)
            if size <= self._end - self._start:  # the common case: the whole frame is buffered
                start = self._start
                self._start += size
                return bytes(self._view[start : start + size])
            payload = bytearray(size)
            got = self._read_into(memoryview(payload))
            if got < size:
                self._eof = True
                raise ProtocolError(f"truncated frame: EOF after {got} of {size} payload bytes")
            return bytes(payload)

    def receive(self, **decode_limits: Any) -> Any:
        """The next frame decoded as a term (``None`` on EOF); ``decode_limits`` go to :func:`etf.decode`."""
        frame = self.read_frame()
        if frame is None:
            return None
        return etf.decode(frame, **decode_limits)

    # -- writing -------------------------------------------------------------------------------

    def write_frame(self, payload: bytes | bytearray | memoryview) -> None:
        """Write one frame, whole, even from many threads at once; :class:`PortClosed` if the reader is gone."""
        size = memoryview(payload).nbytes
        if size > self.max_payload:
            raise ValueError(f"payload of {size} bytes does not fit a {self.packet}-byte length prefix")
        header = size.to_bytes(self.packet, "big")
        with self._write_lock:
            if self._write_closed or self._closed:
                raise PortClosed(f"output fd {self.out_fd} is closed")
            if size <= 65536:
                # One small buffer beats a two-element iovec for the many short event frames.
                pending = [memoryview(header + bytes(payload))]
            else:
                pending = [memoryview(header), memoryview(payload).cast("B")]
            try:
                while pending:
                    n = os.writev(self.out_fd, pending)
                    while n:
                        first = pending[0]
                        if n >= len(first):
                            n -= len(first)
                            pending.pop(0)
                        else:
                            pending[0] = first[n:]
                            n = 0
            except OSError as exc:
                if exc.errno in _CLOSED_ERRNOS:
                    self._write_closed = True
                    raise PortClosed(f"output fd {self.out_fd} closed: {exc.strerror}") from None
                raise

    def send(self, term: Any) -> None:
        """Encode ``term`` (compressed per ``self.compressed``) and write it as one frame."""
        self.write_frame(etf.encode(term, compressed=self.compressed))

    def close(self) -> None:
        """Close both file descriptors (once each); later reads return ``None``, writes raise PortClosed.

        Waits for a write in progress to finish, so a frame is never cut short by closing.
        """
        with self._write_lock:
            if self._closed:
                return
            self._closed = True
        for fd in {self.in_fd, self.out_fd}:
            with contextlib.suppress(OSError):
                os.close(fd)


def protect_stdout() -> int:
    """Keep fd 1 for frames only: return a private, close-on-exec dup of it and point fd 1 at stderr.

    Afterwards ``print()``, ``os.write(1, ...)``, C ``printf`` and child processes all write to
    stderr, so nothing but frames can reach the BEAM's end of the pipe.
    """
    # No stdout, or one already closed, has nothing buffered to lose.
    with contextlib.suppress(AttributeError, OSError, ValueError):
        sys.stdout.flush()
    frames_fd = os.dup(1)
    os.set_inheritable(frames_fd, False)
    try:
        os.dup2(2, 1)
    except OSError:  # started without a stderr: stray output then goes nowhere, not into frames
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.close(null)
    sys.stdout = io.TextIOWrapper(
        io.FileIO(1, "w", closefd=False),
        encoding="utf-8",
        errors="backslashreplace",
        line_buffering=True,
    )
    return frames_fd


def protect_stdin() -> int:
    """Keep fd 0 for frames only: return a private, close-on-exec dup of it and point fd 0 at /dev/null.

    A child process that reads its stdin would otherwise steal bytes from the frame stream.
    """
    frames_fd = os.dup(0)
    os.set_inheritable(frames_fd, False)
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        os.dup2(null, 0)
    finally:
        os.close(null)
    return frames_fd


def open_port(
    *,
    packet: int = 4,
    use_stdio: bool = True,
    compressed: int = 0,
    buffer_size: int = DEFAULT_BUFFER_SIZE,
    max_frame_size: int = DEFAULT_MAX_FRAME,
) -> Port:
    """The worker's port to the BEAM.

    ``use_stdio`` (Erlang's default): frames on fds 0 and 1, both swapped for private
    duplicates (:func:`protect_stdin`, :func:`protect_stdout`). ``use_stdio=False`` (Erlang's
    ``nouse_stdio``): frames on fds 3 and 4; fds 0 and 1 are left alone since they carry no frames.
    """
    if use_stdio:
        in_fd, out_fd = protect_stdin(), protect_stdout()
    else:
        in_fd, out_fd = 3, 4
        for fd in (in_fd, out_fd):
            try:
                os.fstat(fd)
            except OSError:
                raise PortClosed(f"nouse_stdio needs fds 3 and 4 open, fd {fd} is not") from None
    return Port(
        in_fd,
        out_fd,
        packet=packet,
        compressed=compressed,
        buffer_size=buffer_size,
        max_frame_size=max_frame_size,
    )
