"""Every data format x LoRA, 4-bit QLoRA and full fine-tuning, through one real worker (slow).

All 21 jobs go into one worker's queue (FIFO, one at a time), as a BEAM client would submit
them. Each must complete with a lower held-out loss than the base; LoRA weights must have
moved; the saved outputs, reloaded here in the test process, must give the eval loss the job
reported for its in-memory model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from finetune_worker.testing import WorkerHarness
from test_train_helpers import reload_eval_loss, tiny_config

FORMATS = [
    "text.txt",
    "text.jsonl",
    "qa.jsonl",
    "qa.csv",
    "instruction.jsonl",
    "conversations.jsonl",
    "sharegpt.jsonl",
]
METHODS: dict[str, dict[str, Any]] = {
    "lora": {},
    "qlora": {"quantization": {"bits": 4, "use_double_quant": True}},
    "full": {
        "peft": {"method": "full"},
        "training_parameters": {"epochs": 1, "batch_size": 8, "learning_rate": 1e-3, "logging_steps": 5},
    },
}


@pytest.mark.slow
def test_every_format_with_every_method_through_the_worker(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    configs: dict[tuple[str, str], dict[str, Any]] = {}
    for fmt in FORMATS:
        for method, extra in METHODS.items():
            out = tmp_path / f"{method}-{fmt.replace('.', '_')}"
            configs[(fmt, method)] = tiny_config(
                tiny_model_dir, out, fmt, max_steps=10, checkpoint={"every_steps": 100}, **extra
            )
    with WorkerHarness() as w:
        jobs = {}
        for key, cfg in configs.items():
            ok, job = w.call("submit", json.dumps(cfg), w.pid)
            assert str(ok) == "ok"
            jobs[key] = str(job)
        results = {key: w.wait_for(job, "terminal", timeout=600)[-1] for key, job in jobs.items()}
        assert w.call("info")["queue_length"] == 0

    failures = {k: r.payload for k, r in results.items() if r.type != "completed"}
    assert not failures, failures
    for (fmt, method), done in results.items():
        s = done.payload["summary"]
        assert s["final_eval_loss"] < s["base_eval_loss"], (fmt, method, s)
        out = Path(done.payload["outputs"]["output_dir"])
        if method != "full":
            weights = load_file(str(out / "adapter_model.safetensors"))
            assert all(t.abs().sum() > 0 for k, t in weights.items() if "lora_B" in k), (fmt, method)
        reloaded = reload_eval_loss(configs[(fmt, method)], out, quantized=method == "qlora")
        # A 4-bit base reloaded outside prepare_model_for_kbit_training takes slightly different
        # CPU kernels: ~1e-4 relative. A lost or wrong adapter would be off by ~1 (the training gain).
        tol = 2e-3 if method == "qlora" else 1e-4
        assert reloaded == pytest.approx(s["final_eval_loss"], abs=tol), (fmt, method)
