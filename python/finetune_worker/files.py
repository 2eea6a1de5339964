"""Reading files a peer names: regular files only, bounded, never blocking (writing: :mod:`finetune_worker.outputs`).

A path in a job config may name a FIFO (whose ``open`` blocks until a writer comes), a device
(``/dev/zero`` reads forever) or a file far larger than any config. Every file the worker reads
on behalf of a caller, before a job runs (configs, MergeKit YAMLs), goes through
:func:`read_regular_file`: opened with ``O_NONBLOCK``, checked on the open descriptor (so a file
swapped after a check is still the one checked), and read up to a size bound.
"""

from __future__ import annotations

import fcntl
import os
import stat
from typing import BinaryIO


class UnreadableFile(ValueError):
    """Why a file cannot be read: ``reason`` is a short phrase for a config issue."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


def _open_regular(path: str | os.PathLike[str]) -> tuple[int, os.stat_result]:
    """A read-only descriptor of ``path`` (non-blocking) and its stat, checked to be a regular file."""
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
    except OSError as exc:
        os.close(fd)
        raise UnreadableFile(exc.strerror or str(exc)) from None
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def open_regular_file(path: str | os.PathLike[str]) -> BinaryIO:
    """``path`` opened for binary reading; :class:`UnreadableFile` unless it is a regular file.

    For files read as a stream (datasets of any size): the checks of :func:`read_regular_file`
    on the open descriptor, then ordinary blocking reads.
    """
    fd, _ = _open_regular(path)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular_file(path: str | os.PathLike[str], max_bytes: int) -> bytes:
    """The bytes of ``path``; :class:`UnreadableFile` unless it is a regular file of at most ``max_bytes``."""
    fd, info = _open_regular(path)
    try:
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
