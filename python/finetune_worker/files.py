"""Reading files a peer names: regular files only, bounded, never blocking.

A path in a job config may name a FIFO (whose ``open`` blocks until a writer comes), a device
(``/dev/zero`` reads forever) or a file far larger than any config. Every file the worker reads
on behalf of a caller, before a job runs (configs, MergeKit YAMLs), goes through
:func:`read_regular_file`: opened with ``O_NONBLOCK``, checked on the open descriptor (so a file
swapped after a check is still the one checked), and read up to a size bound.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import stat
import time
from collections.abc import Iterator, Sequence
from pathlib import Path


class UnreadableFile(ValueError):
    """Why a file cannot be read: ``reason`` is a short phrase for a config issue."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


def read_regular_file(path: str | os.PathLike[str], max_bytes: int) -> bytes:
    """The bytes of ``path``; :class:`UnreadableFile` unless it is a regular file of at most ``max_bytes``."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise UnreadableFile(exc.strerror or str(exc)) from None
    except ValueError as exc:  # a NUL byte in the path
        raise UnreadableFile(str(exc)) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnreadableFile("not a regular file")
        if info.st_size > max_bytes:
            raise UnreadableFile(f"{info.st_size} bytes, over the {max_bytes} byte limit")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise UnreadableFile(exc.strerror or str(exc)) from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise UnreadableFile(f"over the {max_bytes} byte limit")
    return data


def path_relation(output: str | os.PathLike[str], input: str | os.PathLike[str]) -> str | None:
    """How ``output`` overlaps ``input`` once both are resolved (symlinks, ``..``): ``"is"``,
    ``"contains"``, ``"lies inside"``, or None when neither holds the other."""
    out = os.path.realpath(output)
    inp = os.path.realpath(input)
    if out == inp:
        return "is"
    if inp.startswith(out.rstrip(os.sep) + os.sep):
        return "contains"
    if out.startswith(inp.rstrip(os.sep) + os.sep):
        return "lies inside"
    return None


def overlap_issue(
    output: str | os.PathLike[str], inputs: list[tuple[str, str | os.PathLike[str]]], *, contains: bool = True
) -> str | None:
    """Why ``output`` may not be written given ``inputs`` (``(field, path)`` pairs), or None.

    An output may never be or lie inside an input; with ``contains`` (an output that is replaced
    whole, like a merged model) it may not hold one either.
    """
    for field, path in inputs:
        relation = path_relation(output, path)
        if relation is None or (relation == "contains" and not contains):
            continue
        return (
            f"{relation} the job's input {field} ({os.path.realpath(path)}); writing there would destroy it"
        )
    return None


def destination_issue(dest: Path, inputs: Sequence[tuple[str, Path]]) -> str | None:
    """Why a merge may not replace ``dest``: it is, holds or lies inside an input, or it is an
    allowed root itself (its staging folder would be made outside the roots, beside it)."""
    from finetune_worker.security import allowed_roots

    roots = allowed_roots() or []
    if any(os.path.realpath(dest) == str(root) for root in roots):
        return "is an allowed root itself; write the merged model into a folder inside it"
    return overlap_issue(dest, list(inputs))


class Busy(Exception):
    """Another live process holds the lock; ``holder`` says who (as it wrote it)."""

    def __init__(self, path: Path, holder: str):
        self.path = path
        self.holder = holder
        super().__init__(f"{path} is locked by {holder or 'another process'}")


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (a file, created if needed, or a directory) for the
    ``with`` block.

    The kernel releases it when the process dies, so a crash leaves no stale lock and a reused
    PID (containers) cannot be mistaken for a live owner. The holder of a file lock writes who it
    is into the file; a second taker gets :class:`Busy` naming it, at once.
    """
    is_dir = path.is_dir()
    flags = (os.O_RDONLY | os.O_DIRECTORY) if is_dir else (os.O_RDWR | os.O_CREAT)
    fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = "" if is_dir else os.pread(fd, 400, 0).decode("utf-8", "replace").strip()
            raise Busy(path, holder) from None
        if not is_dir:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; a lock file stays, so no one can race on its removal
