"""Checkpoint directories on disk: the run marker, atomic publication, discovery and rotation.

HF Trainer writes ``checkpoint-N`` in place, file by file, so a kill mid-save leaves a folder
that looks like a checkpoint. We make it write into ``output_dir/.staging/checkpoint-N``
instead and publish it with one ``rename`` once every file is flushed: a ``checkpoint-N``
folder either is complete or does not exist. Leftovers in ``.staging`` are just deleted.
Pure file-system code (no torch), so config validation can use it at submit time.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_worker.files import overlap_issue

if TYPE_CHECKING:
    from finetune_worker.config.train import TrainConfig

RUN_MARKER = ".finetune-worker-run.json"
#: Held (flock) by the job writing into the output_dir; see :func:`output_lock`.
LOCK_FILE = ".finetune-worker.lock"
STAGING = ".staging"
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


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Complete ``checkpoint-N`` folders, oldest first (by step, not mtime: clocks lie)."""
    if not output_dir.is_dir():
        return []
    found: list[tuple[int, Path]] = []
    for child in output_dir.iterdir():
        match = CHECKPOINT_RE.match(child.name)
        if match and is_complete(child):
            found.append((int(match.group(1)), child))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: Path) -> Path | None:
    ckpts = complete_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def checkpoint_step(path: Path) -> int:
    match = CHECKPOINT_RE.match(path.name)
    if match:
        return int(match.group(1))
    state = json.loads((path / "trainer_state.json").read_text())
    return int(state.get("global_step", 0))


def staging_dir(output_dir: Path) -> Path:
    return output_dir / STAGING


def clear_staging(output_dir: Path) -> None:
    """Remove half-written checkpoints of a killed run: they were never published."""
    shutil.rmtree(staging_dir(output_dir), ignore_errors=True)


def publish(staged: Path, output_dir: Path) -> Path:
    """Flush ``staged`` to disk and rename it into ``output_dir`` in one step."""
    _fsync_tree(staged)
    final = output_dir / staged.name
    old: Path | None = None
    if final.exists():
        # A re-save of the same step (resume at a saved step): move the old one out whole, by
        # rename, so a kill at any point leaves either a complete checkpoint-N or none, never a
        # half-deleted one that still looks complete.
        old = staging_dir(output_dir) / f"replaced-{final.name}-{time.monotonic_ns()}"
        os.replace(final, old)
    os.replace(staged, final)
    _fsync_dir(output_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def rotate(output_dir: Path, keep: int, protect: Path | Iterable[Path] | None = None) -> list[Path]:
    """Delete all but the ``keep`` newest complete checkpoints (never one in ``protect``: the one
    just written, the best one); returns what was deleted."""
    kept = {protect} if isinstance(protect, Path) else set(protect or ())
    ckpts = complete_checkpoints(output_dir)
    doomed = [p for p in ckpts[: max(0, len(ckpts) - keep)] if p not in kept]
    for path in doomed:
        # Rename first so a kill mid-delete cannot leave a half-deleted "complete" checkpoint.
        trash = staging_dir(output_dir) / f"deleting-{path.name}-{time.monotonic_ns()}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


# ---- the run marker: which run owns this output_dir ------------------------------------------


def read_marker(output_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((output_dir / RUN_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_marker(output_dir: Path, cfg: TrainConfig) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = output_dir / (RUN_MARKER + ".tmp")
    tmp.write_text(json.dumps({"fingerprint": cfg.run_fingerprint(), "model_name": cfg.model_name}, indent=2))
    os.replace(tmp, output_dir / RUN_MARKER)


def holds_run(output_dir: Path) -> bool:
    """Anything a training run leaves: our marker, checkpoints, or final outputs."""
    if not output_dir.is_dir():
        return False
    if (output_dir / RUN_MARKER).exists() or any(CHECKPOINT_RE.match(p.name) for p in output_dir.iterdir()):
        return True
    return any((output_dir / name).exists() for name in RUN_OUTPUTS)


def output_dir_issue(cfg: TrainConfig) -> str | None:
    """Why ``output_dir`` cannot take this run, or None. Shared by submit-time and run-time checks."""
    out = cfg.resolved(cfg.output_dir)
    try:
        out.exists()
    except PermissionError:  # a parent this user may not search (mode 0500, 0700 of another user)
        return f"'{cfg.output_dir}' is not writable by this user (cannot even look inside its parent folder)"
    if out.exists() and not out.is_dir():
        return f"'{cfg.output_dir}' exists and is not a directory"
    probe = out
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        return f"'{cfg.output_dir}' cannot be created: {probe} is a file, not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"'{cfg.output_dir}' is not writable by this user (nearest existing folder: {probe})"
    inputs: list[tuple[str, str | os.PathLike[str]]] = [("model_name", cfg.resolved(cfg.model_name))]
    clash = overlap_issue(out, inputs, contains=False)
    if clash is not None:
        return f"'{cfg.output_dir}' {clash}; choose another output_dir"
    foreign = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE) if out.is_dir() else []
    if not cfg.overwrite and foreign and not holds_run(out):
        shown = ", ".join(foreign[:5])
        return (
            f"'{cfg.output_dir}' holds files that are not a run of this worker ({shown}...); training writes "
            'the adapter, tokenizer and README.md there. Choose an empty or new output_dir, or set "overwrite": '
            "true to write over those files"
        )
    if cfg.overwrite or not holds_run(out):
        return None
    marker = read_marker(out)
    same = marker is not None and marker.get("fingerprint") == cfg.run_fingerprint()
    if cfg.resume is False:
        return (
            f"'{cfg.output_dir}' holds an earlier run and resume is false; set \"overwrite\": true to "
            'replace it, "resume": "auto" to continue it, or choose another output_dir'
        )
    if cfg.resume == "auto" and not same:
        why = "a run with a different config" if marker else "files of a run this worker did not start"
        return (
            f"'{cfg.output_dir}' holds {why}; choose another output_dir, or set \"overwrite\": true "
            "to replace it"
        )
    return None


def resume_path_issue(cfg: TrainConfig) -> str | None:
    if cfg.resume in ("auto", False):
        return None
    path = cfg.resolved(str(cfg.resume))
    if not path.is_dir():
        return f"no checkpoint directory at '{cfg.resume}'"
    if not is_complete(path):
        return f"'{cfg.resume}' is not a complete checkpoint (no trainer_state.json, or marked incomplete)"
    return None


def wipe_run(output_dir: Path) -> None:
    """``overwrite``: remove what an earlier run left (only the files a run writes)."""
    if not output_dir.is_dir():
        return
    clear_staging(output_dir)
    for child in output_dir.iterdir():
        if CHECKPOINT_RE.match(child.name):
            shutil.rmtree(child, ignore_errors=True)
    (output_dir / RUN_MARKER).unlink(missing_ok=True)


@contextlib.contextmanager
def output_lock(cfg: TrainConfig) -> Iterator[None]:
    """Hold ``output_dir``'s lock for the job: a second job on it (another worker, another machine
    on a shared file system) fails at once with ``output_dir_conflict`` naming the holder."""
    from finetune_worker.errors import JobFailed
    from finetune_worker.files import Busy, exclusive_lock

    out = cfg.resolved(cfg.output_dir)
    with contextlib.ExitStack() as stack:
        try:
            out.mkdir(parents=True, exist_ok=True)
            stack.enter_context(exclusive_lock(out / LOCK_FILE))
        except Busy as exc:
            raise JobFailed(
                "output_dir_conflict",
                f"output_dir: '{cfg.output_dir}' is in use by another job ({exc.holder})",
                hint="Wait for that job to end, or choose another output_dir.",
            ) from None
        except OSError as exc:
            raise JobFailed(
                "output_dir_not_writable",
                f"output_dir: cannot create or lock '{cfg.output_dir}' ({exc.strerror or exc})",
                hint="Choose an output_dir this user can create and write to.",
            ) from None
        yield
