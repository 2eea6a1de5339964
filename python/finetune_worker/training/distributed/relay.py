"""The local event channel from training processes to the worker: msgpack frames on a Unix socket.

Ranks are separate processes, so they cannot call ``ctx.emit``, and their stdout is no place
for frames (it goes to the worker's stderr log). Each rank connects once and sends frames of
``4-byte big-endian length + msgpack map``; the worker's launcher polls the server from the
runner thread. A frame is ``{"rank": int, "type": str, "payload": map}``. msgpack carries only
plain data (no pickle), so a rank cannot make the worker run anything.
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading
from pathlib import Path
from typing import Any

import msgpack

HEADER = struct.Struct(">I")
#: Events are small; a frame beyond this is a bug in the sender, not data to buffer.
MAX_FRAME = 16 * 1024 * 1024


class RelayError(Exception):
    """A malformed frame on the channel."""


def encode_frame(frame: dict[str, Any]) -> bytes:
    # default=str: a stray non-msgpack value (a Path in a summary) travels as text, not as a crash.
    body: bytes = msgpack.packb(frame, use_bin_type=True, default=str)
    return HEADER.pack(len(body)) + body


class FrameReader:
    """Bytes in, frames out (no IO), so partial reads of any size are handled the same way."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buf += data
        frames: list[dict[str, Any]] = []
        while len(self._buf) >= HEADER.size:
            (size,) = HEADER.unpack_from(self._buf)
            if size > MAX_FRAME:
                raise RelayError(f"relay frame of {size} bytes exceeds the {MAX_FRAME} byte limit")
            if len(self._buf) < HEADER.size + size:
                break
            body = bytes(self._buf[HEADER.size : HEADER.size + size])
            del self._buf[: HEADER.size + size]
            frame = msgpack.unpackb(body, raw=False, strict_map_key=False)
            if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
                raise RelayError(f"relay frame is not a map with a 'type': {frame!r:.200}")
            frames.append(frame)
        return frames

    @property
    def pending(self) -> int:
        return len(self._buf)


class RelayServer:
    """Listens on a Unix socket; :meth:`poll` returns the frames that arrived, oldest first."""

    def __init__(self, path: Path):
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        self._sock.listen(64)
        self._sock.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._sock, selectors.EVENT_READ, None)
        self._readers: dict[socket.socket, FrameReader] = {}
        #: Connections that closed, in the order they closed (the last frame names the rank).
        self.closed: list[int | None] = []
        self._conn_rank: dict[socket.socket, int | None] = {}

    def poll(self, timeout: float) -> list[dict[str, Any]]:
        frames: list[dict[str, Any]] = []
        for key, _ in self._sel.select(timeout):
            if key.fileobj is self._sock:
                self._accept()
                continue
            conn = key.fileobj
            assert isinstance(conn, socket.socket)
            try:
                data = conn.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                self._drop(conn)
                continue
            try:
                got = self._readers[conn].feed(data)
            except (RelayError, ValueError, msgpack.UnpackException) as exc:
                frames.append(
                    {
                        "type": "relay_error",
                        "rank": self._conn_rank.get(conn),
                        "payload": {"message": str(exc)},
                    }
                )
                self._drop(conn)
                continue
            for frame in got:
                if isinstance(frame.get("rank"), int):
                    self._conn_rank[conn] = frame["rank"]
            frames.extend(got)
        return frames

    def _accept(self) -> None:
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.setblocking(False)
        self._readers[conn] = FrameReader()
        self._conn_rank[conn] = None
        self._sel.register(conn, selectors.EVENT_READ, None)

    def _drop(self, conn: socket.socket) -> None:
        self._sel.unregister(conn)
        self._readers.pop(conn, None)
        self.closed.append(self._conn_rank.pop(conn, None))
        conn.close()

    def close(self) -> None:
        for conn in list(self._readers):
            self._sel.unregister(conn)
            conn.close()
        self._readers.clear()
        self._sel.close()
        self._sock.close()
        self.path.unlink(missing_ok=True)


class RelayClient:
    """A rank's end: blocking sends under a lock (the Trainer and log handlers may share it)."""

    def __init__(self, path: str, rank: int):
        self.rank = rank
        self._lock = threading.Lock()
        self._sock: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(path)

    def send(self, type: str, **payload: Any) -> None:
        data = encode_frame({"rank": self.rank, "type": type, "payload": payload})
        with self._lock:
            if self._sock is None:
                return
            try:
                self._sock.sendall(data)
            except OSError:
                # The worker is gone: the job ends anyway (the parent-death signal follows).
                self._sock.close()
                self._sock = None

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
