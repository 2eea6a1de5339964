"""``finetune-worker run`` without ``--verbose``: the live display is all the terminal shows.

Third-party warnings (``FutureWarning``s, bitsandbytes' and MLflow's log lines) and progress bars
(transformers' "Loading weights", "Writing model shards", datasets' map bars) would print over
the display. They go to a log file instead, which lands in the job's output folder as
``worker.log`` once the job has made it its own (see :func:`keep_log`).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

LOG_NAME = "worker.log"
#: Progress bars of the Hugging Face stack (huggingface_hub, transformers, datasets) and tqdm's own.
_BARS_OFF = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
}


def capture_third_parties() -> Path:
    """Send logging and warnings to a fresh log file and turn progress bars off; its path."""
    for key, value in _BARS_OFF.items():
        os.environ.setdefault(key, value)
    fd, name = tempfile.mkstemp(prefix="finetune-worker-run-", suffix=".log")
    os.close(fd)
    handler = logging.FileHandler(name, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    logging.captureWarnings(True)
    warnings.simplefilter("default")  # each distinct warning once, into the log
    return Path(name)


def keep_log(log: Path, model: Any, outcome: str | None) -> Path:
    """Move the log into the job's output folder when the job made that folder its own (a
    training run folder, or any output of a completed job); where the log now is."""
    from finetune_worker.config.base import StrictModel
    from finetune_worker.outputs import RUN_MARKER

    logging.shutdown()
    out = getattr(model, "output_dir", None) or getattr(model, "output_path", None)
    if out is None and hasattr(model, "train"):  # a sweep: its folder is its train config's
        out = getattr(model.train, "output_dir", None)
    if not isinstance(out, str):
        return log
    folder = StrictModel.resolved(out)  # as the job resolved it
    owned = folder.is_dir() and (outcome == "completed" or (folder / RUN_MARKER).is_file())
    if not owned:
        return log
    dest = folder / LOG_NAME
    try:
        shutil.move(str(log), dest)
        dest.chmod(0o644)
    except OSError:
        return log
    return dest
