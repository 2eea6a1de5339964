"""Writing outputs: the checks every output folder passes, locks, and staged (atomic) publishing.

- :func:`overlap_issue` / :func:`destination_issue`: an output may never be, hold or lie inside
  an input of its job, nor be an allowed root itself;
- :func:`exclusive_lock`: one writer per folder (``flock``, released by the kernel on death);
- :class:`StagedOutput`: a merged model appears whole or not at all (below);
- training run folders: the marker, checkpoint names and the checks of a ``output_dir``.

A merged model is written so that a cancel, a crash or a kill never leaves a half model in place.

The model is written into a staging directory next to the destination
(``.NAME.merging-PID-XXXX``, hidden, on the same file system) and renamed onto the destination
only once complete. A merge holds an ``flock`` on its own staging directory while it writes
(the kernel releases it when the process dies): a second merge to the same destination finds a
locked staging directory and fails at once, and an unlocked one is a dead merge's and is
removed (a reused PID in a container cannot pass for a live owner).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import stat
import struct
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from finetune_worker.errors import JobFailed

_STAGING = ".merging-"


def current_umask() -> int:
    """The process's umask, read without changing it (``os.umask`` sets it, which would let another
    thread create files meanwhile with a mask of 0)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o077)  # no /proc: the round trip, with a mask that creates nothing looser meanwhile
    os.umask(umask)
    return umask


def share_files(root: Path, recursive: bool = True) -> None:
    """Give the private files in ``root`` (safetensors and ``tempfile`` write 0600) the mode any
    other file gets here (0644 under the usual umask): a model or adapter is meant to be read by
    the group, a serving process, a copy job. Only files of this user; a file that cannot be
    changed is left as it is (the weights are saved either way)."""
    mode = 0o666 & ~current_umask()
    if mode == 0o600 or not root.is_dir():
        return
    for file in root.rglob("*") if recursive else root.iterdir():
        try:
            info = file.lstat()
            if (
                stat.S_ISREG(info.st_mode)
                and stat.S_IMODE(info.st_mode) == 0o600
                and info.st_uid == os.geteuid()
            ):
                file.chmod(mode)
        except OSError:
            continue


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
        self.path.chmod(0o777 & ~current_umask())
        return self

    def publish(self) -> Path:
        """Rename the complete staging directory onto the destination (replacing it if allowed)."""
        assert self.path is not None
        self._check_dest()
        share_files(self.path)
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


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename: a reader sees the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ---- paths an output may not touch; locks ------------------------------------------------------


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


# ---- training run folders: what a run leaves in its output_dir ---------------------------------

RUN_MARKER = ".finetune-worker-run.json"
#: Held (flock) by the job writing into the output_dir; see :func:`output_lock`.
LOCK_FILE = ".finetune-worker.lock"
STAGING = ".staging"
#: The run's tokenized data (Arrow files), reused on resume and removed once the run completes.
DATA_CACHE = ".data-cache"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
#: Written by transformers' own jit checkpointing while a save is in progress.
INCOMPLETE_SENTINEL = "checkpoint-is-incomplete.txt"
#: Files a finished run leaves behind; their presence without our marker means "someone else's run".
RUN_OUTPUTS = ("summary.json", "adapter_config.json", "model.safetensors", "trainer_state.json")


def is_complete(path: Path) -> bool:
    """A checkpoint we can resume from: published, with trainer state, not mid-jit-save."""
    return (
        path.is_dir()
        and (path / "trainer_state.json").is_file()
        and not (path / INCOMPLETE_SENTINEL).exists()
    )


def read_marker(output_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((output_dir / RUN_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def holds_run(output_dir: Path) -> bool:
    """Anything a training run leaves: our marker, checkpoints, or final outputs."""
    if not output_dir.is_dir():
        return False
    if (output_dir / RUN_MARKER).exists() or any(CHECKPOINT_RE.match(p.name) for p in output_dir.iterdir()):
        return True
    return any((output_dir / name).exists() for name in RUN_OUTPUTS)


def run_folder_issue(
    out: Path, shown: str, *, model_dir: Path, overwrite: bool, resume: bool | str, fingerprint: str
) -> str | None:
    """Why a training ``output_dir`` (``out``, written ``shown`` in the config) cannot take a run
    with this config ``fingerprint``, or None. Shared by submit-time and run-time checks."""
    try:
        out.exists()
    except PermissionError:  # a parent this user may not search (mode 0500, 0700 of another user)
        return f"'{shown}' is not writable by this user (cannot even look inside its parent folder)"
    if out.exists() and not out.is_dir():
        return f"'{shown}' exists and is not a directory"
    probe = out
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        return f"'{shown}' cannot be created: {probe} is a file, not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"'{shown}' is not writable by this user (nearest existing folder: {probe})"
    inputs: list[tuple[str, str | os.PathLike[str]]] = [("model_name", model_dir)]
    clash = overlap_issue(out, inputs, contains=False)
    if clash is not None:
        return f"'{shown}' {clash}; choose another output_dir"
    foreign = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE) if out.is_dir() else []
    if not overwrite and foreign and not holds_run(out):
        shown = ", ".join(foreign[:5])
        return (
            f"'{shown}' holds files that are not a run of this worker ({shown}...); training writes "
            'the adapter, tokenizer and README.md there. Choose an empty or new output_dir, or set "overwrite": '
            "true to write over those files"
        )
    if overwrite or not holds_run(out):
        return None
    marker = read_marker(out)
    same = marker is not None and marker.get("fingerprint") == fingerprint
    if resume is False:
        return (
            f"'{shown}' holds an earlier run and resume is false; set \"overwrite\": true to "
            'replace it, "resume": "auto" to continue it, or choose another output_dir'
        )
    if resume == "auto" and not same:
        why = "a run with a different config" if marker else "files of a run this worker did not start"
        return f"'{shown}' holds {why}; choose another output_dir, or set \"overwrite\": true to replace it"
    return None


def resume_checkpoint_issue(path: Path, shown: str) -> str | None:
    """Why ``path`` (a ``resume`` checkpoint, written ``shown``) cannot be resumed from, or None."""
    if not path.is_dir():
        return f"no checkpoint directory at '{shown}'"
    if not is_complete(path):
        return f"'{shown}' is not a complete checkpoint (no trainer_state.json, or marked incomplete)"
    return None
