"""The ``merge_lora`` and ``merge`` (MergeKit) job configs.

The seed formats validate as written: ``{"base_model_path", "adapter_path", "output_path",
"use_fp16"}`` and ``{"yaml_config_path", "output_dir", "cpu_offload"}``. Paths in the JSON
resolve against the worker's working directory, like every other job config; model paths
inside a MergeKit YAML resolve against the YAML's own directory (see ``merging.yaml_config``).
Nothing here imports torch or mergekit: ``submit`` must answer at once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from finetune_worker.config.base import MAX_SEED, StrictModel
from finetune_worker.errors import ConfigIssue
from finetune_worker.kinds import JobKind
from finetune_worker.outputs import destination_issue


class _MergeBase(StrictModel):
    overwrite: bool = Field(
        False, description="Replace a non-empty output directory (only once the new model is complete)."
    )

    def output_issues(
        self, key: str, value: str, inputs: Sequence[tuple[str, Path]] = ()
    ) -> list[ConfigIssue]:
        out = self.resolved(value)
        if out.exists() and not out.is_dir():
            return [ConfigIssue(key, "exists and is not a directory", value)]
        problem = destination_issue(out, inputs)
        if problem is not None:
            return [ConfigIssue(key, problem, value)]
        if out.is_dir() and any(out.iterdir()) and not self.overwrite:
            return [
                ConfigIssue(
                    key,
                    'is a non-empty directory; choose a new path or set "overwrite": true to replace it',
                    value,
                )
            ]
        parent = next((p for p in out.parents if p.exists()), None)
        if parent is not None and not (parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)):
            return [ConfigIssue(key, f"'{parent}' is not a writable directory", value)]
        return []


class MergeLoraConfig(_MergeBase):
    """Merge a peft (LoRA-family) adapter into its base and save a standalone model."""

    job: Literal["merge_lora"] = Field("merge_lora", description="Job kind.")
    base_model_path: str = Field(..., description="Local directory of the (unquantized) base model.")
    adapter_path: str = Field(
        ..., description="peft adapter directory (adapter_config.json), e.g. a training output_dir."
    )
    output_path: str = Field(..., description="Directory the merged model is written to.")
    use_fp16: bool | None = Field(
        None, description="Seed spelling of the precision: true = fp16, false = fp32 (unless dtype says)."
    )
    dtype: Literal["fp32", "fp16", "bf16"] | None = Field(
        None, description="Precision the base is loaded, merged and saved in; default fp32."
    )

    @field_validator("dtype")
    @classmethod
    def _one_precision(cls, dtype: str | None, info: ValidationInfo) -> str | None:
        use_fp16 = info.data.get("use_fp16")
        if dtype is not None and use_fp16 is not None and use_fp16 != (dtype == "fp16"):
            raise ValueError(
                f'conflicts with "use_fp16": {str(use_fp16).lower()}; set only one of them (dtype preferred)'
            )
        return dtype

    @property
    def precision(self) -> str:
        """fp32, fp16 or bf16: ``dtype`` if given, else from ``use_fp16``."""
        return self.dtype or ("fp16" if self.use_fp16 else "fp32")

    def environment_issues(self) -> list[ConfigIssue]:
        issues: list[ConfigIssue] = []
        base = self.resolved(self.base_model_path)
        if not base.is_dir():
            issues.append(
                ConfigIssue(
                    "base_model_path",
                    "no local model directory there; this worker loads models from local paths (no hub access)",
                    self.base_model_path,
                )
            )
        elif not (base / "config.json").is_file():
            issues.append(
                ConfigIssue("base_model_path", "has no config.json (not a model)", self.base_model_path)
            )
        adapter = self.resolved(self.adapter_path)
        if not adapter.is_dir():
            issues.append(ConfigIssue("adapter_path", "no adapter directory there", self.adapter_path))
        elif not (adapter / "adapter_config.json").is_file():
            issues.append(
                ConfigIssue(
                    "adapter_path", "has no adapter_config.json (not a peft adapter)", self.adapter_path
                )
            )
        inputs = [("base_model_path", base), ("adapter_path", adapter)]
        return issues + self.output_issues("output_path", self.output_path, inputs)


class MergeKitConfig(_MergeBase):
    """Run a MergeKit YAML merge (slerp, linear, ties, dare_ties, task_arithmetic, ...) in process."""

    job: Literal["merge"] = Field("merge", description="Job kind.")
    yaml_config_path: str = Field(
        ..., description="MergeKit YAML; model paths in it resolve against its directory."
    )
    output_dir: str = Field(..., description="Directory the merged model is written to.")
    cpu_offload: bool = Field(
        True,
        description="Keep weights and intermediate results in CPU RAM (lazy loading) and use the GPU, if any, "
        "only for the arithmetic; false keeps everything on the GPU when there is one.",
    )
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="Seed for randomized methods (dare_ties, dare_linear, della)."
    )

    def environment_issues(self) -> list[ConfigIssue]:
        from finetune_worker.config.mergekit_yaml import check_merge_yaml
        from finetune_worker.extras import missing_extra

        issues: list[ConfigIssue] = []
        missing = missing_extra("mergekit")
        if missing is not None:
            issues.append(ConfigIssue("job", missing))
        path = self.resolved(self.yaml_config_path)
        if not path.is_file():
            what = "is a directory, not a file" if path.is_dir() else "does not exist"
            issues.append(ConfigIssue("yaml_config_path", f"'{self.yaml_config_path}' {what}"))
        else:
            for where, message in check_merge_yaml(path):
                issues.append(ConfigIssue("yaml_config_path", f"{where}: {message}" if where else message))
        from finetune_worker.config.mergekit_yaml import merge_inputs

        inputs = merge_inputs(path) if path.is_file() else [("yaml_config_path", path)]
        return issues + self.output_issues("output_dir", self.output_dir, inputs)


KINDS = (
    JobKind(
        "merge", MergeKitConfig, run="finetune_worker.merging.mergekit_job:run",
        recognise=lambda keys: "yaml_config_path" in keys, order=10,
    ),
    JobKind(
        "merge_lora", MergeLoraConfig, run="finetune_worker.merging.lora:run",
        recognise=lambda keys: {"adapter_path", "base_model_path"} <= keys, order=20,
    ),
)  # fmt: skip
