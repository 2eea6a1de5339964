"""The ``sweep`` job: an Optuna study whose trials are real training runs.

Each trial is the train job (:func:`finetune_worker.training.job.run`) on the trial's config, in
``trial-N`` inside the sweep's folder, run with a :class:`TrialContext`: its events go out as
the sweep's, tagged with ``trial``, and its cancel flag is set when the sweep is cancelled or
when Optuna prunes the trial (its ``eval`` events are reported to the study as they come).

The study lives in the folder's ``study.journal`` (Optuna's JournalStorage on a file), so a
sweep stopped by a cancel, a crash or a kill continues where it stopped: finished trials are
kept, and a trial that was running runs again with the same values, from its last checkpoint.
One sweep per folder: the folder's lock is held for the whole job, so a trial the journal shows
running belongs to a sweep that is gone.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune_worker.config.sweep import (
    JOURNAL,
    SWEEP_MARKER,
    TRIAL_PREFIX,
    TRIALS_CSV,
    TRIALS_JSON,
    SweepConfig,
    trial_config_issues,
)
from finetune_worker.context import JobContext
from finetune_worker.errors import JobCancelled, JobFailed
from finetune_worker.outputs import DATA_CACHE, LOCK_FILE, Busy, exclusive_lock, write_text_atomic
from finetune_worker.training import checkpoints as ckpt
from finetune_worker.training import job as train_job

STUDY = "sweep"
#: Trials that fail in a row, none having succeeded, before the sweep gives up: the problem is
#: then the train config, not the sampled values.
FAILURE_STREAK = 3
#: Optuna's trial states as the trials table names them.
STATES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "interrupted"}


class _EitherFlag:
    """Set when either flag is: the sweep's cancel or the trial's pruning."""

    def __init__(self, *flags: Any):
        self._flags = flags

    def is_set(self) -> bool:
        return any(f.is_set() for f in self._flags)


class TrialContext(JobContext):
    """What a trial's train job gets: the sweep's context, its events tagged with the trial."""

    def __init__(self, parent: JobContext, number: int, config: Any, on_eval: Callable[[int, float], bool]):
        """``on_eval(step, eval_loss)`` hears each evaluation during training; True prunes the trial."""
        self._parent = parent
        self._on_eval = on_eval
        self.number = number
        self.job_id = parent.job_id
        self.kind = "train"
        self.config = config
        self.pruned = threading.Event()
        self.cancel_event = _EitherFlag(parent.cancel_event, self.pruned)
        self.last_step = 0
        # Every trial tokenizes the same rows the same way: the first builds the cache, the rest reuse it.
        self.data_cache = parent.config.folder / DATA_CACHE

    def emit(self, type: str, **payload: Any) -> None:
        self._parent.emit(type, trial=self.number, **payload)
        if isinstance(payload.get("step"), int) and "unit" not in payload:  # a training step, not rows
            self.last_step = payload["step"]
        # The evaluations during training (the base and final ones name their model).
        if type == "eval" and "model" not in payload and not self.pruned.is_set():
            loss = (payload.get("metrics") or {}).get("eval_loss")
            if (
                isinstance(loss, float)
                and isinstance(payload.get("step"), int)
                and self._on_eval(payload["step"], loss)
            ):
                self.pruned.set()  # the trainer stops at the next step boundary
                self.log(f"trial {self.number}: pruned at step {payload['step']} (eval_loss {loss:.4f})")

    def request(self, type: str, payload: dict[str, Any], *, size: int, timeout_s: float) -> list[Any] | None:
        return self._parent.request(type, {**payload, "trial": self.number}, size=size, timeout_s=timeout_s)


def run(ctx: JobContext) -> dict[str, Any]:
    cfg: SweepConfig = ctx.config
    out = cfg.folder
    try:
        out.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(out / LOCK_FILE):
            return _sweep(ctx, cfg, out)
    except Busy as exc:
        raise JobFailed(
            "output_dir_conflict",
            f"train.output_dir: '{cfg.train.output_dir}' is in use by another job ({exc.holder})",
            hint="Wait for that job to end, or choose another output_dir.",
        ) from None
    except PermissionError as exc:
        raise JobFailed(
            "output_dir_not_writable",
            f"train.output_dir: cannot write to '{cfg.train.output_dir}' ({exc.strerror})",
            hint="Choose an output_dir this user can create and write to.",
        ) from None


def _sweep(ctx: JobContext, cfg: SweepConfig, out: Path) -> dict[str, Any]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the job's own events say what happens
    problem = cfg.folder_issue()  # checked at submit; the folder may have changed while the job queued
    if problem is not None:
        raise JobFailed("output_dir_conflict", f"train.output_dir: {problem}", hint=ckpt.CONFLICT_HINT)
    if not cfg.continues():
        _wipe(out)
    write_text_atomic(out / SWEEP_MARKER, json.dumps({"fingerprint": cfg.fingerprint()}, indent=2))
    study = optuna.create_study(
        study_name=STUDY, storage=open_journal(out), direction=cfg.direction, load_if_exists=True
    )
    if not study.get_trials(deepcopy=False):
        for values in cfg.first_trials:
            study.enqueue_trial(dict(values))
    else:
        ctx.log(f"continuing the sweep in {out}: {_finished(study)} of {cfg.trial_count} trials done")
    study.pruner = _pruner(cfg)
    total = cfg.trial_count
    # The ETA counts the time of the trials finished before a resume too.
    started = time.monotonic() - sum(float(t.user_attrs.get("runtime_s") or 0.0) for t in study.trials)
    failed_in_a_row = 0
    while _finished(study) < total:
        ctx.check_cancelled()
        trial = _next_trial(ctx, cfg, study)
        state = _run_trial(ctx, cfg, study, trial)
        _write_table(out, study)
        done = _finished(study)
        ctx.progress(done, total, unit="trials", started=started)
        failed_in_a_row = failed_in_a_row + 1 if state == "failed" else 0
        if failed_in_a_row >= FAILURE_STREAK and not _succeeded(study):
            raise _all_failed(study, f"the first {failed_in_a_row} trials all failed; stopped")
    if not _succeeded(study):
        raise _all_failed(study, f"all {total} trials failed")
    ckpt.clear_data_cache(out)  # the trials' shared data, kept while trials remained
    return _result(cfg, study, out)


def _next_trial(ctx: JobContext, cfg: SweepConfig, study: Any) -> Any:
    """The trial to run: one a stop interrupted (it runs again with its values), else a new one."""
    import optuna

    interrupted = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    if interrupted:
        frozen = interrupted[0]
        message = f"trial {frozen.number} was interrupted: it runs again with the same values"
        ctx.emit("log", level="info", message=message, trial=frozen.number)
        return optuna.trial.Trial(study, frozen._trial_id)
    study.sampler = _sampler(cfg, len(study.get_trials(deepcopy=False)))
    return study.ask()


def _run_trial(ctx: JobContext, cfg: SweepConfig, study: Any, trial: Any) -> str:
    """Train one trial and tell the study how it ended; returns its state in the table's words.
    A cancel of the sweep leaves the trial running in the journal (a resume runs it again)."""
    import optuna

    number = trial.number
    params = {key: _suggest(trial, key, param) for key, param in cfg.search_space.items()}
    trial_dir = cfg.trial_dir(number)
    trial.set_user_attr("output_dir", str(trial_dir))

    def say(message: str, level: str = "info") -> None:
        ctx.emit("log", level=level, message=f"trial {number}: {message}", trial=number)

    say(", ".join(f"{k} = {v}" for k, v in params.items()))
    tried = time.monotonic()
    prior = float(trial.user_attrs.get("runtime_s") or 0.0)

    def record(**attrs: Any) -> None:
        attrs["runtime_s"] = round(prior + time.monotonic() - tried, 3)
        for key, value in attrs.items():
            trial.set_user_attr(key, value)

    def on_eval(step: int, loss: float) -> bool:
        trial.report(loss, step)
        return bool(cfg.pruning is not None and cfg.pruning.enabled and trial.should_prune())

    problems = trial_config_issues(cfg, params, number)
    if problems:  # validate tried the bounds of each key alone, not every combination
        message = "the sampled values make an invalid train config: " + "; ".join(problems)
        record(error="invalid_config", message=message)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        say(f"failed: {message}", level="warning")
        return "failed"
    child = TrialContext(ctx, number, cfg.trial_config(params, number), on_eval)
    try:
        result = train_job.run(child)
    except JobCancelled as exc:
        record(steps=exc.step)
        if not child.pruned.is_set():
            say("the sweep was cancelled; submit it again to continue (this trial runs again)", "warning")
            _write_table(cfg.folder, study)
            raise JobCancelled(step=exc.step, checkpoint=exc.checkpoint) from None
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        _clear_trial(trial_dir)
        ctx.check_cancelled(step=exc.step)
        return "pruned"
    except JobFailed as exc:
        record(steps=child.last_step, error=exc.error, message=exc.message)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        say(f"failed: {exc.error}: {exc.message}", level="warning")
        return "failed"
    summary = result.get("summary") or {}
    loss = summary.get("final_eval_loss")
    record(steps=summary.get("steps"))
    if not isinstance(loss, (int, float)):
        record(error="training_diverged", message="the trial ended without a finite held-out loss")
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        say("failed: no finite held-out loss", level="warning")
        return "failed"
    study.tell(trial, float(loss))
    say(f"eval_loss {loss:.4f}")
    return "complete"


def _suggest(trial: Any, key: str, param: Any) -> Any:
    if param.type == "categorical":
        return trial.suggest_categorical(key, param.choices)
    # The last value the step reaches as the high end (Optuna warns about a range it must trim).
    (_, low), (_, high) = param.bounds()
    if param.type == "int":
        return int(trial.suggest_int(key, low, high, step=param.int_step, log=param.log))
    return trial.suggest_float(key, low, high, step=param.step, log=param.log)


def _sampler(cfg: SweepConfig, number: int) -> Any:
    """The sampler of trial ``number``. A random or TPE trial N draws with seed + N, so a resumed
    sweep samples as an uninterrupted one would (a sampler made once would start its draws over).
    The grid keeps one seed: it is the order its points are visited in."""
    import optuna

    seed = cfg.sampler_seed + number
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if cfg.sampler == "grid":

        class Grid(optuna.samplers.GridSampler):
            def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
                pass  # GridSampler stops the study inside optimize() only (ask/tell raises); we count

        # validate made sure every parameter is countable (a float has a step)
        grid = {key: param.grid() or [] for key, param in cfg.search_space.items()}
        return Grid(grid, seed=cfg.sampler_seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=cfg.random_trials)


def _pruner(cfg: SweepConfig) -> Any:
    import optuna

    pruning = cfg.pruning
    if pruning is None or not pruning.enabled:
        return optuna.pruners.NopPruner()
    every = cfg.train.eval.every_steps or 1
    return optuna.pruners.PercentilePruner(
        pruning.percentile,
        n_startup_trials=pruning.startup_trials,
        # Reported steps are training steps; the first prunable evaluation is the one after the warmup.
        n_warmup_steps=pruning.warmup_evaluations * every + 1 if pruning.warmup_evaluations else 0,
        n_min_trials=pruning.min_trials,
    )


def open_journal(out: Path) -> Any:
    """The study's journal. This job holds the folder's lock, so a lock file Optuna left behind
    is a dead process's, and a line torn by a kill is dropped (it was never acknowledged)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path = out / JOURNAL
    Path(f"{path}.lock").unlink(missing_ok=True)
    if path.is_file():
        data = path.read_bytes()
        whole = data[: data.rfind(b"\n") + 1]
        if len(whole) != len(data):
            with path.open("r+b") as f:
                f.truncate(len(whole))
    return JournalStorage(JournalFileBackend(str(path)))


def _wipe(out: Path) -> None:
    """A fresh start: remove what an earlier sweep left (only the files a sweep writes)."""
    for child in out.iterdir():
        if (
            child.is_dir()
            and child.name.startswith(TRIAL_PREFIX)
            and child.name[len(TRIAL_PREFIX) :].isdigit()
        ):
            shutil.rmtree(child, ignore_errors=True)
    for name in (JOURNAL, f"{JOURNAL}.lock", TRIALS_JSON, TRIALS_CSV, SWEEP_MARKER):
        (out / name).unlink(missing_ok=True)


def _clear_trial(trial_dir: Path) -> None:
    """A pruned trial is never resumed: its checkpoints and data cache go, its metrics stay."""
    for checkpoint in ckpt.complete_checkpoints(trial_dir):
        shutil.rmtree(checkpoint, ignore_errors=True)
    ckpt.clear_staging(trial_dir)
    ckpt.clear_data_cache(trial_dir)


def _finished(study: Any) -> int:
    return sum(1 for t in study.get_trials(deepcopy=False) if t.state.is_finished())


def _succeeded(study: Any) -> bool:
    import optuna

    return bool(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))


def _all_failed(study: Any, what: str) -> JobFailed:
    failed = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("error")]
    last = failed[-1].user_attrs if failed else {}
    return JobFailed(
        str(last.get("error") or "internal_error"),
        f"{what}; the last: {last.get('message')}",
        hint="The trials' own failures are in the trials table (trials.json) and their logs.",
        details={"trials": len(failed)},
    )


def trials_table(study: Any) -> list[dict[str, Any]]:
    """One row per trial: its number, state, values, held-out loss, steps and folder."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        state = STATES.get(t.state.name, t.state.name.lower())
        loss = (
            t.value
            if state == "complete"
            else (t.intermediate_values.get(t.last_step) if t.last_step is not None else None)
        )
        row: dict[str, Any] = {
            "trial": t.number,
            "state": state,
            "params": dict(t.params),
            "eval_loss": loss,
            "steps": t.user_attrs.get("steps"),
            "output_dir": t.user_attrs.get("output_dir"),
            "runtime_s": t.user_attrs.get("runtime_s"),
        }
        if t.user_attrs.get("error"):
            row.update(error=t.user_attrs["error"], message=t.user_attrs.get("message"))
        rows.append(row)
    return rows


def _write_table(out: Path, study: Any) -> Path:
    """``trials.json`` (the table and the best trial) and ``trials.csv`` (one row per trial)."""
    rows = trials_table(study)
    best = _best(study)
    write_text_atomic(out / TRIALS_JSON, json.dumps({**best, "trials": rows}, indent=2))
    keys = sorted({k for r in rows for k in r["params"]})
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["trial", "state", *keys, "eval_loss", "steps", "output_dir", "error", "message"])
    for r in rows:
        writer.writerow(
            [r["trial"], r["state"], *(r["params"].get(k) for k in keys), r["eval_loss"], r["steps"],
             r["output_dir"], r.get("error"), r.get("message")]
        )  # fmt: skip
    write_text_atomic(out / TRIALS_CSV, text.getvalue())
    return out / TRIALS_JSON


def _best(study: Any) -> dict[str, Any]:
    if not _succeeded(study):
        return {"best_trial": None, "best_params": None, "best_eval_loss": None}
    best = study.best_trial
    return {"best_trial": best.number, "best_params": dict(best.params), "best_eval_loss": best.value}


def _result(cfg: SweepConfig, study: Any, out: Path) -> dict[str, Any]:
    table = _write_table(out, study)
    best = _best(study)
    best_dir = cfg.trial_dir(best["best_trial"])
    weights = "model_path" if cfg.train.peft.method == "full" else "adapter_path"
    rows = trials_table(study)
    return {
        "outputs": {"output_dir": str(out), "trials_path": str(table), weights: str(best_dir)},
        "summary": {
            **best,
            "trials": rows,
            "runtime_s": round(sum(float(r["runtime_s"] or 0.0) for r in rows), 3),
        },
    }
