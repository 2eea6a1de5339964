"""Experiment tracking for training runs: MLflow, TensorBoard and Weights & Biases.

Each backend is a ``TrainerCallback``: it logs the run's parameters when it starts, the
training metrics at every logging step and the eval metrics after every evaluation, and on
:func:`finish_tracking` the run's final scores and files.
Tracking must never cost a training run: every call into a backend is guarded, and the first
failure (package missing, server unreachable, disk full) turns that backend off with a
``log`` warning while training goes on.

Run names are stable: ``tracking.run_name``, else the output directory's name plus the run
fingerprint, so a resumed run logs into the run it started (MLflow and W&B continue it).

Used by the training job::

    trackers = tracking_callbacks(cfg.tracking, ctx, out)   # [] when tracking is off
    trainer = build_trainer(..., callbacks=[events, *trackers], ...)
    summary["tracking"] = tracking_summary(trackers)
    finish_tracking(trackers, out, summary=summary)          # or status="FAILED" / "KILLED"

The final files are the run's documents (summary, report, metrics history, model card); the
adapter or model files are copied into a store only when its section says ``log_model``: they
stay in ``output_dir``, which every backend records, instead of a second copy per run.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from finetune_worker.config.tracking import MlflowSection, TensorboardSection, TrackingConfig, WandbSection
from finetune_worker.context import JobContext
from finetune_worker.security import redact
from finetune_worker.training.callbacks import preference_values

#: Files of output_dir that are not the trained model: tracking stores, run bookkeeping.
_NOT_ARTIFACTS = re.compile(r"^(\.|mlflow\.db|checkpoint-|runs$|wandb$|mlartifacts$)")
#: The run's documents, small and always uploaded (unless log_artifacts is off).
DOCUMENTS = ("summary.json", "report.html", "metrics.jsonl", "README.md")
#: Counts in the evaluation section's metrics, not scores.
_COUNTS = frozenset({"rows", "scored_tokens", "answered_rows"})
_TRAIN_KEYS = ("loss", "learning_rate", "grad_norm", "epoch")


def tracking_callbacks(
    cfg: TrackingConfig | None, ctx: JobContext, output_dir: Path, *, resuming: bool = True
) -> list[Tracker]:
    """Start a run in every enabled backend; backends that cannot start are skipped with a warning.

    ``resuming`` says whether training continues from a checkpoint: only then may a backend
    continue an interrupted run of the same name instead of starting a new one.
    """
    if cfg is None or not cfg.enabled():
        return []
    out = Path(output_dir)
    name = cfg.run_name or default_run_name(ctx, out)
    params = flat_params(ctx.config)
    trackers: list[Tracker] = []
    for backend, section in (("mlflow", cfg.mlflow), ("tensorboard", cfg.tensorboard), ("wandb", cfg.wandb)):
        if backend not in cfg.enabled():
            continue
        tracker = _BACKENDS[backend](name, section, out, ctx)
        tracker.may_resume = resuming
        if tracker.start(params):
            trackers.append(tracker)
    if trackers:
        where = "; ".join(t.describe() for t in trackers)
        ctx.emit("log", level="info", message=f"tracking run '{name}': {where}", run_name=name)
    return trackers


def tracking_summary(trackers: list[Tracker]) -> dict[str, Any]:
    """What goes into summary.json and the ``completed`` event: each backend's run and where it is."""
    return {t.name: t.info() for t in trackers}


def finish_tracking(
    trackers: list[Tracker],
    output_dir: Path | None,
    status: str = "FINISHED",
    summary: dict[str, Any] | None = None,
) -> None:
    """Log the run's final scores, upload its final files (only for a finished run) and close
    every run with ``status``."""
    finals = final_metrics(summary) if summary else []
    for tracker in trackers:
        artifacts: list[Path] = []
        if output_dir is not None and status == "FINISHED":
            artifacts = final_artifacts(
                Path(output_dir), model=bool(getattr(tracker.section, "log_model", False))
            )
        tracker.finish(artifacts, status, finals)


def final_metrics(summary: dict[str, Any]) -> list[tuple[dict[str, float], int]]:
    """``(metrics, step)`` of the run's result: the base model's scores at step 0, the fine-tuned
    model's at the last step. ``base/``/``final/`` are the loss and perplexity on the held-out
    split; ``evaluation/base/``/``evaluation/fine_tuned/`` the evaluation section's scores, and
    ``preference/base/``/``preference/fine_tuned/`` a preference run's."""

    def scores(stage: str) -> dict[str, Any]:
        out = {}
        for name in ("evaluation", "preference"):
            section = (summary.get(name) or {}).get("metrics") or {}
            out.update(
                {f"{name}/{stage}/{k}": v for k, v in (section.get(stage) or {}).items() if k not in _COUNTS}
            )
        return out

    base = {
        "base/eval_loss": summary.get("base_eval_loss"),
        "base/perplexity": summary.get("base_perplexity"),
        **scores("base"),
    }
    final = {
        "final/eval_loss": summary.get("final_eval_loss"),
        "final/perplexity": summary.get("final_perplexity"),
        "final/train_loss": summary.get("train_loss"),
        "final/improvement_pct": summary.get("improvement_pct"),
        **scores("fine_tuned"),
    }
    steps = summary.get("steps")
    last = steps if isinstance(steps, int) else 0
    return [(m, step) for m, step in ((_numbers(base), 0), (_numbers(final), last)) if m]


def default_run_name(ctx: JobContext, out: Path) -> str:
    fingerprint = getattr(ctx.config, "run_fingerprint", None)
    digest = fingerprint()[:8] if callable(fingerprint) else hashlib.sha256(str(out).encode()).hexdigest()[:8]
    return f"{out.name}-{digest}"


def flat_params(config: Any) -> dict[str, str]:
    """The job config as dotted keys (``peft.r``), secrets redacted, values as strings."""
    data = config.model_dump(mode="json") if hasattr(config, "model_dump") else dict(config or {})
    data = redact(data)  # URL credentials (an MLflow URI with user:password) too
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                key = f"{prefix}.{k}" if prefix else str(k)
                walk(key, v)
        else:
            out[prefix] = (
                json.dumps(value) if isinstance(value, (list, bool)) or value is None else str(value)
            )

    walk("", data)
    return out


def final_artifacts(out: Path, model: bool = False) -> list[Path]:
    """The run's documents in output_dir; with ``model``, every other top-level file of the result
    too (adapter/model weights, configs, tokenizer)."""
    if not out.is_dir():
        return []
    files = [p for p in out.iterdir() if p.is_file() and not _NOT_ARTIFACTS.match(p.name)]
    return sorted(p for p in files if model or p.name in DOCUMENTS)


def is_model_file(path: Path) -> bool:
    return path.name not in DOCUMENTS


class Tracker(TrainerCallback):
    """One backend. Subclasses implement ``_start``, ``_log``, ``_finish`` and ``info``."""

    name = "tracker"

    def __init__(self, run_name: str, section: Any, output_dir: Path, ctx: JobContext):
        self.run_name = run_name
        self.section = section
        self.output_dir = output_dir
        self._ctx = ctx
        self.active = False
        self.error: str | None = None
        self.may_resume = True
        #: A preference run's loss is not a language-modelling loss: no perplexity from it.
        self._language_model = getattr(ctx.config, "preference", None) is None

    # ---- lifecycle, every call guarded ------------------------------------------------------

    def start(self, params: dict[str, str]) -> bool:
        self.active = self._guard("start", self._start, params)
        return self.active

    def finish(
        self, artifacts: list[Path], status: str, finals: list[tuple[dict[str, float], int]] | None = None
    ) -> None:
        """Log the run's final scores, upload ``artifacts`` and close the run. A failed log of the
        scores still closes the run (else it would stay RUNNING in the store)."""
        if not self.active:
            return
        for metrics, step in finals or []:
            if metrics:
                self._guard("logging", self._log_final, metrics, step)
        self._guard("finish", self._finish, artifacts, status)
        self.active = False

    def describe(self) -> str:
        return self.name

    def info(self) -> dict[str, Any]:
        return {"run_name": self.run_name, "error": self.error}

    def _guard(self, what: str, fn: Any, *args: Any) -> bool:
        try:
            fn(*args)
            return True
        except Exception as exc:  # tracking must never stop training
            self.active = False
            self.error = redact(f"{type(exc).__name__}: {exc}")[:500]  # errors may quote a URI
            self._ctx.log(
                f"tracking: {self.name} {what} failed, so {self.name} logging is off for this run; "
                f"training goes on ({self.error})",
                level="warning",
            )
            return False

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.active and metrics:
            self._guard("logging", self._log, metrics, step)

    # ---- TrainerCallback hooks ------------------------------------------------------------

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        logs = logs or {}
        if "loss" in logs:
            values = {f"train/{k}": logs.get(k) for k in _TRAIN_KEYS}
            values.update({f"train/{k}": v for k, v in preference_values(logs).items()})
            self.log_metrics(_numbers(values), state.global_step)

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        self.log_eval(metrics or {}, state.global_step)

    def log_eval(self, metrics: dict[str, Any], step: int) -> None:
        """An evaluation's ``eval_*`` metrics as ``eval/*``, with the perplexity of its loss; the
        Trainer's (through on_evaluate), or the evaluation section's when it stands in for it."""
        values = {f"eval/{k.removeprefix('eval_')}": v for k, v in metrics.items() if k.startswith("eval_")}
        loss = metrics.get("eval_loss")
        if isinstance(loss, (int, float)) and loss < 700 and self._language_model:
            values["eval/perplexity"] = math.exp(loss)
        self.log_metrics(_numbers(values), step)

    # ---- backend specifics ------------------------------------------------------------------

    def _start(self, params: dict[str, str]) -> None:
        raise NotImplementedError

    def _log(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def _finish(self, artifacts: list[Path], status: str) -> None:
        raise NotImplementedError

    def _log_final(self, metrics: dict[str, float], step: int) -> None:
        self._log(metrics, step)


class MlflowTracker(Tracker):
    name = "mlflow"
    section: MlflowSection

    def __init__(self, run_name: str, section: Any, output_dir: Path, ctx: JobContext):
        super().__init__(run_name, section, output_dir, ctx)
        shared = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
        #: Where the URI came from: the job's config, the worker's environment, or the default.
        self.uri_from = (
            "config" if section.tracking_uri else ("MLFLOW_TRACKING_URI" if shared else "output_dir")
        )
        self.tracking_uri = section.tracking_uri or shared or f"sqlite:///{output_dir / 'mlflow.db'}"
        self.experiment = (
            section.experiment_name
            or os.environ.get("MLFLOW_EXPERIMENT_NAME", "").strip()
            or "finetune-worker"
        )
        self.run_id: str | None = None
        self.resumed = False
        self._client: Any = None

    def _start(self, params: dict[str, str]) -> None:
        # An unreachable server would otherwise be retried with backoff for minutes on every call.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
        from mlflow import MlflowClient
        from mlflow.entities import Param

        uri = self.tracking_uri
        if uri.startswith(("http://", "https://")):
            _probe(uri)
            uri = self._credentials_to_env(uri)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(self.experiment)
        if exp is None:
            exp_id = client.create_experiment(self.experiment, artifact_location=_artifacts_beside(uri))
        else:
            exp_id = exp.experiment_id
        quoted = self.run_name.replace("'", "\\'")
        previous = client.search_runs(
            [exp_id],
            filter_string=f"tags.mlflow.runName = '{quoted}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if self.may_resume and previous and previous[0].info.status != "FINISHED":
            # An interrupted run with this name: a resume continues it.
            self.run_id, self.resumed = previous[0].info.run_id, True
            client.update_run(self.run_id, status="RUNNING")
        else:
            # The weights stay in output_dir (copied only with log_model): the tag says where.
            tags = {
                "finetune_worker.job_id": self._ctx.job_id,
                "finetune_worker.output_dir": str(self.output_dir.resolve()),
                **self.section.tags,
            }
            self.run_id = client.create_run(exp_id, run_name=self.run_name, tags=tags).info.run_id
            items = [Param(k, v[:6000]) for k, v in params.items()]
            for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
                client.log_batch(self.run_id, params=items[i : i + 100])
        self._client = client

    def _credentials_to_env(self, uri: str) -> str:
        """``uri`` without ``user:password@``, which MLflow then reads from its own variables.

        MLflow prints "View run at <uri>" to stdout: with the credentials in the URI they would
        land in the worker's log. Jobs run one at a time, so the variables are this job's.
        """
        parts = urllib.parse.urlsplit(uri)
        if parts.username is None:
            return uri
        os.environ["MLFLOW_TRACKING_USERNAME"] = urllib.parse.unquote(parts.username)
        os.environ["MLFLOW_TRACKING_PASSWORD"] = urllib.parse.unquote(parts.password or "")
        netloc = parts.netloc.rsplit("@", 1)[1]
        return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

    def _log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def _finish(self, artifacts: list[Path], status: str) -> None:
        try:
            if self.section.log_artifacts:
                for path in artifacts:
                    self._client.log_artifact(
                        self.run_id, str(path), "model" if is_model_file(path) else None
                    )
            self._client.set_terminated(self.run_id, status=status)
        finally:
            if urllib.parse.urlsplit(self.tracking_uri).username is not None:
                # This job's credentials must not reach the next job's server.
                os.environ.pop("MLFLOW_TRACKING_USERNAME", None)
                os.environ.pop("MLFLOW_TRACKING_PASSWORD", None)

    def describe(self) -> str:
        origin = " (from MLFLOW_TRACKING_URI)" if self.uri_from == "MLFLOW_TRACKING_URI" else ""
        resumed = " (resumed)" if self.resumed else ""
        return f"mlflow run {self.run_id}{resumed} in experiment '{self.experiment}' at {redact(self.tracking_uri)}{origin}"

    def info(self) -> dict[str, Any]:
        return {
            **super().info(),
            "run_id": self.run_id,
            "tracking_uri": redact(self.tracking_uri),  # credentials stay in the config only
            "experiment": self.experiment,
        }


class TensorboardTracker(Tracker):
    name = "tensorboard"
    section: TensorboardSection

    def __init__(self, run_name: str, section: Any, output_dir: Path, ctx: JobContext):
        super().__init__(run_name, section, output_dir, ctx)
        self.log_dir = Path(section.log_dir) if section.log_dir else output_dir / "runs" / run_name
        self._writer: Any = None

    def _start(self, params: dict[str, str]) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self._writer = SummaryWriter(log_dir=str(self.log_dir))
        table = "\n".join(f"| {k} | {v} |" for k, v in params.items())
        self._writer.add_text("config", f"| param | value |\n|---|---|\n{table}", 0)
        self._writer.flush()

    def _log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, step)
        self._writer.flush()  # a killed worker still leaves the curves on disk

    def _finish(self, artifacts: list[Path], status: str) -> None:
        summary = next((p for p in artifacts if p.name == "summary.json"), None)
        if summary is not None:
            self._writer.add_text("summary", f"```\n{summary.read_text()[:20000]}\n```", 0)
        self._writer.close()

    def describe(self) -> str:
        return f"tensorboard {self.log_dir}"

    def info(self) -> dict[str, Any]:
        return {**super().info(), "log_dir": str(self.log_dir)}


class WandbTracker(Tracker):
    name = "wandb"
    section: WandbSection

    def __init__(self, run_name: str, section: Any, output_dir: Path, ctx: JobContext):
        super().__init__(run_name, section, output_dir, ctx)
        # W&B run ids allow only [A-Za-z0-9_-]; derived from the name, so a resume continues the run.
        self.run_id = re.sub(r"[^A-Za-z0-9_-]", "-", run_name)[:64]
        self.dir = Path(section.dir) if section.dir else output_dir
        self._run: Any = None

    def _start(self, params: dict[str, str]) -> None:
        import wandb

        self.dir.mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(
            project=self.section.project,
            entity=self.section.entity,
            name=self.run_name,
            id=self.run_id,
            resume="allow",  # same name, same run id: a rerun or resume continues it
            mode=self.section.mode,
            dir=str(self.dir),
            config=params,
            tags=self.section.tags or None,
            reinit="create_new",  # several jobs in one worker process: never reuse another job's run
            settings=wandb.Settings(silent=True, console="off"),
        )

    def _log(self, metrics: dict[str, float], step: int) -> None:
        self._run.log(metrics, step=step)

    def _log_final(self, metrics: dict[str, float], step: int) -> None:
        # W&B takes only increasing steps: the base model's step-0 scores go in the run summary.
        self._run.summary.update(metrics)

    def _finish(self, artifacts: list[Path], status: str) -> None:
        import wandb

        for kind, files in (
            ("results", [p for p in artifacts if not is_model_file(p)]),
            ("model", [p for p in artifacts if is_model_file(p)]),
        ):
            if files:
                artifact = wandb.Artifact(f"{self.run_id}-{kind}", type=kind)
                for path in files:
                    artifact.add_file(str(path))
                self._run.log_artifact(artifact)
        self._run.finish(exit_code=0 if status == "FINISHED" else 1)

    def describe(self) -> str:
        return f"wandb {self.section.mode} run {self.run_id} in {self.dir}"

    def info(self) -> dict[str, Any]:
        run_dir = getattr(self._run, "dir", None)
        return {
            **super().info(),
            "run_id": self.run_id,
            "mode": self.section.mode,
            "dir": str(run_dir or self.dir),
        }


_BACKENDS: dict[str, type[Tracker]] = {
    "mlflow": MlflowTracker,
    "tensorboard": TensorboardTracker,
    "wandb": WandbTracker,
}


def _probe(uri: str) -> None:
    """Fail fast (3 s) when an MLflow server does not answer, instead of stalling a training step.

    ``user:password@`` in the URI (MLflow's basic auth, which requests honours) is sent as an
    Authorization header: urllib would take it for part of the host name.
    """
    parts = urllib.parse.urlsplit(uri)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    url = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", ""))
    request = urllib.request.Request(url)
    if parts.username is not None:
        user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=3) as response:
            response.read(64)
    except urllib.error.HTTPError:
        return  # it answered: an old server without /health is still a server
    except (urllib.error.URLError, OSError) as exc:
        raise ConnectionError(
            f"MLflow server {redact(uri)} is unreachable ({getattr(exc, 'reason', exc)})"
        ) from None


def _artifacts_beside(uri: str) -> str | None:
    """A new experiment's artifact folder for a sqlite store: ``mlartifacts`` beside the database
    file, read as SQLAlchemy reads the URI (MLflow's default is ./mlartifacts of the worker's cwd,
    wherever that is). None (the server's or the store's own default) for other stores and for an
    in-memory database."""
    from sqlalchemy.engine import make_url  # MLflow's own dependency, here only with MLflow
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(uri)
    except ArgumentError:
        return None
    if not url.drivername.startswith("sqlite") or url.database in (None, "", ":memory:"):
        return None
    return (Path(url.database).resolve().parent / "mlartifacts").as_uri()


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = float(value)
    return out
