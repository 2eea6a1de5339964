"""The ``evaluate`` and ``generate`` job configs.

The names users already rely on validate as written: ``{"job": "evaluate", "model_path",
"adapter_path", "dataset": {"path"}, "output_dir"}`` and ``{"job": "generate", "model_path",
"adapter_path", "prompts": [...], "max_new_tokens", "temperature", "seed"}``. Everything else
is optional with a default. Nothing here imports torch: ``submit`` must answer at once.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, model_validator

from finetune_worker.config.data import DataConfig
from finetune_worker.config.generation import EvalDataset, Message, Prompt, Sampling, StrictSection
from finetune_worker.config.train import Quantization, quantization_issues
from finetune_worker.data.sources import Source, preview_issues
from finetune_worker.errors import ConfigIssue
from finetune_worker.kinds import JobKind

__all__ = ["EvalDataset", "EvaluateConfig", "GenerateConfig", "Message", "ModelSource", "Prompt", "Sampling"]


class ModelSource(StrictSection):
    """Which model to load: a full model directory, or a base plus a peft adapter."""

    model_path: str = Field(
        ..., description="Local model directory (or a training output_dir holding an adapter)."
    )
    adapter_path: str | None = Field(None, description="peft adapter directory applied on top of model_path.")
    quantization: Quantization | None = Field(
        None, description="Load the base in 4/8-bit (bitsandbytes); null loads it unquantized."
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on CUDA that supports it, fp32 on CPU."
    )

    def model_issues(self, prefix: str = "") -> list[ConfigIssue]:
        return _model_issues(
            self, f"{prefix}model_path", self.model_path, f"{prefix}adapter_path", self.adapter_path
        ) + quantization_issues(self.quantization, f"{prefix}quantization")

    def output_issues(self, output_dir: str | None) -> list[ConfigIssue]:
        if output_dir is None:
            return []
        out = self.resolved(output_dir)
        if out.exists() and not out.is_dir():
            return [ConfigIssue("output_dir", "exists and is not a directory", output_dir)]
        parent = next((p for p in [out, *out.parents] if p.exists()), None)
        if parent is not None and not os.access(parent, os.W_OK):
            return [ConfigIssue("output_dir", f"'{parent}' is not writable", output_dir)]
        return []


class EvaluateConfig(ModelSource):
    """An evaluation job: loss, perplexity and generated-answer metrics on a dataset."""

    job: Literal["evaluate"] = Field("evaluate", description="Job kind.")
    dataset: EvalDataset = Field(..., description="Examples to evaluate on.")
    output_dir: str | None = Field(
        None, description="Where metrics.json and predictions.jsonl go; null writes no files."
    )
    data: DataConfig = Field(
        default_factory=DataConfig,
        description="Row format and chat template, read the same way training reads them.",
    )
    max_rows: int | None = Field(None, gt=0, description="Evaluate only the first N rows.")
    batch_size: int = Field(8, gt=0, description="Rows per forward pass (loss) and per generate call.")
    generate_answers: bool = Field(
        True, description="Generate an answer for rows with a reference and score it (EM, F1, BLEU, ROUGE-L)."
    )
    generation: Sampling = Field(
        default_factory=lambda: Sampling(max_new_tokens=64),
        description="How answers are generated; greedy by default so scores are reproducible.",
    )
    compare_model_path: str | None = Field(
        None, description="A second model (usually the base) evaluated the same way, to report improvement."
    )
    compare_adapter_path: str | None = Field(
        None, description="peft adapter applied on top of compare_model_path."
    )

    @model_validator(mode="after")
    def _compare_adapter_needs_model(self) -> EvaluateConfig:
        if self.compare_adapter_path is not None and self.compare_model_path is None:
            raise ValueError("compare_adapter_path needs compare_model_path (the base it applies to)")
        return self

    def environment_issues(self) -> list[ConfigIssue]:
        issues = self.model_issues()
        if self.compare_model_path is not None:
            issues += _model_issues(
                self,
                "compare_model_path",
                self.compare_model_path,
                "compare_adapter_path",
                self.compare_adapter_path,
            )
        issues += [ConfigIssue("dataset.path", message) for message in preview_issues(self.source)]
        return issues + self.output_issues(self.output_dir)

    @property
    def source(self) -> Source:
        return self.data.source(
            self.resolved(self.dataset.path),
            "dataset",
            split=self.dataset.split,
            file_format=self.dataset.file_format,
        )


class GenerateConfig(ModelSource, Sampling):
    """A generation job: completions for a list of prompts, streamed as ``token`` events."""

    job: Literal["generate"] = Field("generate", description="Job kind.")
    prompts: list[Prompt] = Field(
        ...,
        min_length=1,
        description="Plain strings, or chat message lists (rendered with the chat template).",
    )
    num_return_sequences: int = Field(1, gt=0, le=16, description="Completions per prompt.")
    output_dir: str | None = Field(None, description="Where completions.jsonl goes; null writes no file.")
    chat_template: str | None = Field(
        None, description="Jinja chat template overriding the tokenizer's (ChatML when it has none)."
    )
    system_prompt: str | None = Field(
        None, description="System message added to chat prompts that carry none."
    )

    @model_validator(mode="after")
    def _greedy_has_one_answer(self) -> GenerateConfig:
        if self.num_return_sequences > 1 and self.temperature == 0:
            raise ValueError(
                "num_return_sequences > 1 needs temperature > 0 (greedy decoding gives one answer)"
            )
        return self

    def environment_issues(self) -> list[ConfigIssue]:
        return self.model_issues() + self.output_issues(self.output_dir)


def _model_issues(
    cfg: ModelSource, model_key: str, model_path: str, adapter_key: str, adapter_path: str | None
) -> list[ConfigIssue]:
    issues: list[ConfigIssue] = []
    model = cfg.resolved(model_path)
    if not model.is_dir():
        issues.append(
            ConfigIssue(
                model_key,
                f"no local model at '{model_path}'; this worker loads models from local paths (no hub access)",
            )
        )
    elif not (model / "config.json").is_file() and not (model / "adapter_config.json").is_file():
        issues.append(
            ConfigIssue(
                model_key,
                f"'{model_path}' holds neither a model (config.json) nor an adapter (adapter_config.json)",
            )
        )
    if adapter_path is not None:
        adapter = cfg.resolved(adapter_path)
        if not adapter.is_dir():
            issues.append(ConfigIssue(adapter_key, f"no adapter directory at '{adapter_path}'"))
        elif not (adapter / "adapter_config.json").is_file():
            issues.append(
                ConfigIssue(adapter_key, f"'{adapter_path}' has no adapter_config.json (not a peft adapter)")
            )
    return issues


KINDS = (
    JobKind(
        "generate", GenerateConfig, run="finetune_worker.evaluation.job:run_generate",
        recognise=lambda keys: "prompts" in keys, order=40,
    ),
    JobKind(
        "evaluate", EvaluateConfig, run="finetune_worker.evaluation.job:run_evaluate",
        recognise=lambda keys: {"model_path", "dataset"} <= keys, order=50,
    ),
)  # fmt: skip
