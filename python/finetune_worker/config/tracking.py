"""The ``tracking`` section of a train config: MLflow, TensorBoard and Weights & Biases.

The promised form ``{"mlflow": {"tracking_uri": "..."}, "tensorboard": true, "wandb":
{"mode": "offline"}}`` validates as written; ``true`` turns a backend on with its defaults,
``false``/``null``/absent leaves it off. Nothing here imports a tracking package: they are
optional extras, and a missing one is a warning at run time, never a config error.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from finetune_worker.config.base import StrictModel, schema_also

_BOOL = {"type": "boolean"}


class _Section(StrictModel):
    pass


class MlflowSection(_Section):
    tracking_uri: str | None = Field(
        None,
        description="MLflow server (http://host:5000) or database URI; default: the MLFLOW_TRACKING_URI "
        "environment variable (one store shared by every run, so runs compare), else a sqlite store in output_dir.",
    )
    experiment_name: str | None = Field(
        None,
        min_length=1,
        description="Experiment the run goes in; default: MLFLOW_EXPERIMENT_NAME, else finetune-worker.",
    )
    log_artifacts: bool = Field(
        True,
        description="Upload the run's summary.json, report.html, metrics.jsonl and model card when training ends.",
    )
    log_model: bool = Field(
        False,
        description="Also copy the adapter/model files into the store (a second copy of the weights); "
        "they stay in output_dir either way, which the run's finetune_worker.output_dir tag names.",
    )
    tags: dict[str, str] = Field(default_factory=dict, description="Extra run tags.")


class TensorboardSection(_Section):
    log_dir: str | None = Field(
        None, description="Event file directory; default: output_dir/runs/<run name>."
    )


class WandbSection(_Section):
    mode: Literal["offline", "online", "disabled"] = Field(
        "offline",
        description="offline writes a local run (sync it later with `wandb sync`); needs no network.",
    )
    project: str = Field("finetune-worker", min_length=1, description="W&B project.")
    entity: str | None = Field(None, description="W&B team or user; default: the logged-in user's.")
    dir: str | None = Field(None, description="Where wandb writes its files; default: output_dir.")
    tags: list[str] = Field(default_factory=list, description="Run tags.")
    log_model: bool = Field(
        False,
        description="Also log the adapter/model files as a W&B model artifact (a second copy of the weights).",
    )


class TrackingConfig(_Section):
    """Experiment tracking backends; each is optional and failures never stop training."""

    run_name: str | None = Field(
        None,
        min_length=1,
        description="Run name in every backend; default: output_dir's name plus the run fingerprint (stable on resume).",
    )
    mlflow: MlflowSection | None = Field(
        None, description="Log to MLflow; true for the defaults.", json_schema_extra=schema_also(_BOOL)
    )
    tensorboard: TensorboardSection | None = Field(
        None,
        description="Write TensorBoard event files; true for the defaults.",
        json_schema_extra=schema_also(_BOOL),
    )
    wandb: WandbSection | None = Field(
        None,
        description="Log to Weights & Biases; true for the defaults.",
        json_schema_extra=schema_also(_BOOL),
    )

    @field_validator("mlflow", "tensorboard", "wandb", mode="before")
    @classmethod
    def _bool_means_defaults(cls, value: object) -> object:
        if value is True:
            return {}
        if value is False:
            return None
        return value

    def enabled(self) -> list[str]:
        wandb_on = self.wandb is not None and self.wandb.mode != "disabled"
        return [
            name
            for name, on in (
                ("mlflow", self.mlflow is not None),
                ("tensorboard", self.tensorboard is not None),
                ("wandb", wandb_on),
            )
            if on
        ]
