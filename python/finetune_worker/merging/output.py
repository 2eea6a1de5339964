"""Write a merged model so that a cancel, a crash or a kill never leaves a half model in place.

The model is written into a staging directory next to the destination
(``.NAME.merging-PID-XXXX``, hidden, on the same file system) and renamed onto the destination
only once complete. A merge holds an ``flock`` on its own staging directory while it writes
(the kernel releases it when the process dies): a second merge to the same destination finds a
locked staging directory and fails at once, and an unlocked one is a dead merge's and is
removed (a reused PID in a container cannot pass for a live owner).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from finetune_worker.errors import JobFailed
from finetune_worker.files import Busy, destination_issue, exclusive_lock

_STAGING = ".merging-"


class StagedOutput:
    """``with StagedOutput(dest, overwrite) as stage: write into stage.path; stage.publish()``."""

    def __init__(self, dest: Path, *, overwrite: bool, key: str, inputs: Sequence[tuple[str, Path]] = ()):
        self.dest = dest
        self.overwrite = overwrite
        self.key = key  # the config field naming dest, for error messages
        self.inputs = list(inputs)
        self.path: Path | None = None
        self.published = False
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> StagedOutput:
        self._check_dest()
        self._stack = contextlib.ExitStack()
        try:
            self.dest.parent.mkdir(parents=True, exist_ok=True)
            _claim_staging(self.dest, self.key)  # a live merge's folder: conflict; a dead one's: removed
            self.path = Path(
                tempfile.mkdtemp(prefix=f".{self.dest.name}{_STAGING}{os.getpid()}-", dir=self.dest.parent)
            )
            self._stack.enter_context(exclusive_lock(self.path))
            _claim_staging(self.dest, self.key, own=self.path)  # two merges that started together
        except PermissionError as exc:
            self._stack.close()
            raise JobFailed(
                "output_dir_not_writable",
                f"{self.key}: cannot write next to '{self.dest}' ({exc.strerror})",
                hint=f"Choose a {self.key} this user can create and write to.",
            ) from exc
        except BaseException:
            self._stack.close()
            if self.path is not None:
                shutil.rmtree(self.path, ignore_errors=True)
            raise
        # mkdtemp makes a private directory; a model directory should be as readable as any other.
        umask = os.umask(0)
        os.umask(umask)
        self.path.chmod(0o777 & ~umask)
        return self

    def publish(self) -> Path:
        """Rename the complete staging directory onto the destination (replacing it if allowed)."""
        assert self.path is not None
        self._check_dest()
        umask = os.umask(0)
        os.umask(umask)
        for file in self.path.rglob("*"):
            if file.is_file():  # safetensors writes 0600 files; a model should be readable like the rest
                file.chmod(0o666 & ~umask)
        old: Path | None = None
        if self.dest.exists():
            old = self.dest.with_name(f".{self.dest.name}.replaced-{os.getpid()}")
            if old.exists():
                shutil.rmtree(old)
            os.replace(self.dest, old)
        os.replace(self.path, self.dest)
        self.published = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.dest

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self.published and self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
        self._stack.close()  # releases the destination's lock

    def _check_dest(self) -> None:
        check_destination(self.dest, overwrite=self.overwrite, key=self.key, inputs=self.inputs)


def check_destination(
    dest: Path, *, overwrite: bool, key: str, inputs: Sequence[tuple[str, Path]] = ()
) -> None:
    """Checked at submit too, but the directory may have filled up while the job queued."""
    problem = destination_issue(dest, inputs)
    if problem is not None:
        raise JobFailed("output_dir_conflict", f"{key}: '{dest}' {problem}", hint=f"Choose another {key}.")
    if dest.exists() and not dest.is_dir():
        raise JobFailed("output_dir_conflict", f"{key}: '{dest}' exists and is not a directory")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise JobFailed(
            "output_dir_conflict",
            f"{key}: '{dest}' is not empty",
            hint='Choose a new path, or set "overwrite": true to replace it once the merge is complete.',
        )


def _claim_staging(dest: Path, key: str, own: Path | None = None) -> None:
    """Look at every staging folder of ``dest`` but ``own``: one whose merge is alive holds its
    ``flock`` (a second merge to ``dest`` then fails at once); one whose lock is free belongs to a
    merge that died (the kernel dropped its lock; a reused PID cannot fake one) and is removed,
    as are folders a publish replaced and did not get to delete."""
    for entry in dest.parent.glob(f".{dest.name}{_STAGING}*"):
        if entry == own or not entry.is_dir():
            continue
        try:
            with exclusive_lock(entry):
                shutil.rmtree(entry, ignore_errors=True)
        except Busy:
            raise JobFailed(
                "output_dir_conflict",
                f"{key}: another merge is writing '{dest}' (into {entry.name})",
                hint=f"Wait for it to end, or choose another {key}.",
            ) from None
        except FileNotFoundError:
            continue  # its merge finished or cleaned up meanwhile
    for entry in dest.parent.glob(f".{dest.name}.replaced-*"):
        shutil.rmtree(entry, ignore_errors=True)


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def count_tensors(path: Path) -> int:
    """Tensors in the directory's safetensors files, read from their headers (no weights loaded)."""
    total = 0
    for file in sorted(path.glob("*.safetensors")):
        with contextlib.suppress(OSError, ValueError, struct.error), file.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
            total += sum(1 for k in header if k != "__metadata__")
    return total
