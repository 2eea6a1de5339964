"""Helpers shared by the training tests (no tests here): tiny configs, in-process runs, reloading outputs."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from finetune_worker.config import parse_job_config
from finetune_worker.server.jobs import JobManager
from finetune_worker.wire.vocabulary import Event

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "configs" / "data"


def tiny_config(
    model: Path, out: Path, data_file: str = "conversations.jsonl", **over: Any
) -> dict[str, Any]:
    """A short, fast LoRA run on the tiny model; keyword arguments replace top-level sections."""
    cfg: dict[str, Any] = {
        "job": "train",
        "model_name": str(model),
        "output_dir": str(out),
        "dataset": {"path": str(DATA / data_file), "validation_split": 0.15},
        "data": {"max_seq_length": 128},
        "peft": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "training_parameters": {"epochs": 1, "batch_size": 8, "learning_rate": 5e-3, "logging_steps": 1},
        "max_steps": 12,
        "checkpoint": {"every_steps": 4, "keep": 2},
        "seed": 7,
    }
    cfg.update(over)
    return cfg


class Run:
    """One job run in process (JobManager + list sink), with its events."""

    def __init__(self, config: dict[str, Any], *, env_checks: bool = True):
        from finetune_worker.config.train import TrainConfig

        self.events: list[Event] = []
        self._done = threading.Event()
        self.manager = JobManager(self._sink, job_prefix="t")
        if env_checks:
            kind, model = parse_job_config(json.dumps(config))
        else:  # schema only: for inputs that broke after the (earlier) submit-time checks
            kind, model = "train", TrainConfig.model_validate(config)
        self.job_id = self.manager.submit(kind, model)

    def _sink(self, record: Any, event: Event) -> None:
        self.events.append(event)
        if event.terminal:
            self._done.set()

    def wait(self, timeout: float = 300) -> Event:
        assert self._done.wait(timeout), f"job did not finish in {timeout}s: {[e.type for e in self.events]}"
        return self.terminal

    def wait_for(self, type: str, pred: Any = None, timeout: float = 300) -> Event:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in list(self.events):
                if e.type == type and (pred is None or pred(e.payload)):
                    return e
            if self._done.is_set():
                break
            time.sleep(0.02)
        raise AssertionError(f"no {type} event; got {[e.type for e in self.events]}")

    @property
    def terminal(self) -> Event:
        return next(e for e in self.events if e.terminal)

    def of(self, type: str) -> list[dict[str, Any]]:
        return [e.payload for e in self.events if e.type == type]

    def close(self) -> None:
        self.manager.close(grace_s=30)


def run_job(config: dict[str, Any], timeout: float = 300) -> Run:
    run = Run(config)
    try:
        run.wait(timeout)
    finally:
        run.close()
    return run


def reload_eval_loss(config: dict[str, Any], out: Path, *, quantized: bool = False) -> float:
    """Eval loss of the *saved* outputs on the job's own held-out rows (fresh process state)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from finetune_worker.config.train import TrainConfig
    from finetune_worker.training.data import build_datasets

    cfg = TrainConfig.model_validate(config)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        kwargs["device_map"] = "cpu"
    if (out / "adapter_config.json").exists():
        base = AutoModelForCausalLM.from_pretrained(cfg.model_name, **kwargs)
        model = PeftModel.from_pretrained(base, str(out))
    else:
        model = AutoModelForCausalLM.from_pretrained(str(out), **kwargs)
    _, eval_rows, _ = build_datasets(
        cfg.data,
        tokenizer,
        Path(cfg.dataset.path),
        validation_split=cfg.dataset.validation_split,
        seed=cfg.seed,
    )
    # Token-weighted over the held-out rows, one unpadded row at a time: what the job reports,
    # computed here with plain transformers only.
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in eval_rows:
            ids = torch.tensor([row["input_ids"]])
            labels = torch.tensor([row["labels"]])
            n = int((labels[..., 1:] != -100).sum())
            if n:
                total += float(model(input_ids=ids, labels=labels).loss) * n
                count += n
    return total / count
