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
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from finetune_worker.outputs import (
    CHECKPOINT_RE,
    DATA_CACHE,
    LOCK_FILE,
    RUN_MARKER,
    STAGING,
    is_complete,
    read_marker,
    resume_checkpoint_issue,
    run_folder_issue,
    share_files,
)

if TYPE_CHECKING:
    from finetune_worker.config.train import TrainConfig


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


def clear_data_cache(output_dir: Path) -> None:
    """Remove the run's tokenized data: it only serves a resume of this run."""
    shutil.rmtree(output_dir / DATA_CACHE, ignore_errors=True)


def publish(staged: Path, output_dir: Path) -> Path:
    """Flush ``staged`` to disk and rename it into ``output_dir`` in one step."""
    share_files(staged)
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


def output_dir_issue(cfg: TrainConfig) -> str | None:
    """Why ``output_dir`` cannot take this run, or None (submit-time and run-time checks alike)."""
    return run_folder_issue(
        cfg.paths.output,
        cfg.output_dir,
        model_dir=cfg.paths.model,
        overwrite=cfg.overwrite,
        resume=cfg.resume,
        fingerprint=cfg.run_fingerprint(),
    )


def resume_path_issue(cfg: TrainConfig) -> str | None:
    if cfg.paths.resume is None:  # "auto" or false
        return None
    return resume_checkpoint_issue(cfg.paths.resume, str(cfg.resume))


def write_marker(output_dir: Path, cfg: TrainConfig) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = output_dir / (RUN_MARKER + ".tmp")
    tmp.write_text(json.dumps({"fingerprint": cfg.run_fingerprint(), "model_name": cfg.model_name}, indent=2))
    os.replace(tmp, output_dir / RUN_MARKER)


def wipe_run(output_dir: Path) -> None:
    """``overwrite``: remove what an earlier run left (only the files a run writes)."""
    if not output_dir.is_dir():
        return
    clear_staging(output_dir)
    clear_data_cache(output_dir)
    for child in output_dir.iterdir():
        if CHECKPOINT_RE.match(child.name):
            shutil.rmtree(child, ignore_errors=True)
    (output_dir / RUN_MARKER).unlink(missing_ok=True)
    # The previous run's history and pages: a fresh run must not inherit its curves.
    from finetune_worker.training.callbacks import METRICS_FILE
    from finetune_worker.training.report import REPORT
    from finetune_worker.training.run_card import NEXT_DIR

    for name in (METRICS_FILE, REPORT):
        (output_dir / name).unlink(missing_ok=True)
    shutil.rmtree(output_dir / NEXT_DIR, ignore_errors=True)


@contextlib.contextmanager
def output_lock(cfg: TrainConfig) -> Iterator[None]:
    """Hold ``output_dir``'s lock for the job: a second job on it (another worker, another machine
    on a shared file system) fails at once with ``output_dir_conflict`` naming the holder."""
    from finetune_worker.errors import JobFailed
    from finetune_worker.outputs import Busy, exclusive_lock

    out = cfg.paths.output
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


def prepare_output_dir(cfg: TrainConfig, out: Path) -> Path | None:
    """Re-check paths and the output directory when the job starts (a queued job may wait while
    files change); claim it with the run marker; return the checkpoint to resume from. Used by the
    single-process job and by the distributed launcher alike."""
    from finetune_worker.errors import JobFailed
    from finetune_worker.hf import model_not_found
    from finetune_worker.training.failures import dataset_not_found

    if not cfg.paths.model.is_dir():
        raise model_not_found("model_name", cfg.model_name)
    for source in cfg.sources:
        if not source.path.exists():
            raise dataset_not_found(f"{source.where}.path", str(source.path))
    problem = output_dir_issue(cfg)
    if problem is not None:
        if "not writable" in problem or "not a directory" in problem or "cannot be created" in problem:
            raise JobFailed(
                "output_dir_not_writable",
                f"output_dir: {problem}",
                hint="Choose an output_dir this user can create and write to.",
            )
        raise JobFailed("output_dir_conflict", f"output_dir: {problem}", hint=CONFLICT_HINT)
    problem = resume_path_issue(cfg)
    if problem is not None:
        raise JobFailed("invalid_config", f"resume: {problem}", hint="Point resume at a checkpoint-N folder.")

    marker = read_marker(out)
    same_run = marker is not None and marker.get("fingerprint") == cfg.run_fingerprint()
    fresh = cfg.resume is False or (cfg.resume == "auto" and not same_run)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if fresh and cfg.overwrite:
            wipe_run(out)
        clear_staging(out)  # half-written checkpoints of a killed run were never published
        write_marker(out, cfg)
    except PermissionError as exc:
        raise JobFailed(
            "output_dir_not_writable",
            f"output_dir: cannot write to '{cfg.output_dir}' ({exc.strerror})",
            hint="Choose an output_dir this user can create and write to.",
        ) from exc
    if cfg.resume == "auto":
        return latest_checkpoint(out) if same_run else None
    if cfg.resume is False:
        return None
    return cfg.paths.resume


CONFLICT_HINT = (
    'Use a fresh output_dir, set "resume": "auto" with the same config to continue that run, or '
    '"overwrite": true to replace it.'
)
