"""Helpers shared by the merge tests (no tests here): run a job in process, make adapters, compare logits."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch

from finetune_worker.config import parse_job_config
from finetune_worker.server.jobs import JobManager, JobRecord
from finetune_worker.wire.vocabulary import Event

#: A fixed batch: token ids below the tiny vocabulary (1017), two rows of 24.
BATCH = torch.tensor(
    [[(7 * i + 3) % 1000 + 4 for i in range(24)], [(13 * i + 5) % 1000 + 4 for i in range(24)]]
)


def run_job(
    config: Any, *, cancel_after: str | None = None, timeout: float = 300, after_submit_checks: Any = None
) -> list[Event]:
    """Validate ``config``, run it on a real JobManager's runner thread, return its events.

    ``cancel_after``: cancel the job as soon as an event of that type arrives (from the runner thread,
    so the job sees the flag at its very next check). ``after_submit_checks``: called between validation
    and queueing, to change the world the way it can change while a job waits in the queue.
    """
    kind, model = parse_job_config(config)
    if after_submit_checks is not None:
        after_submit_checks()
    events: list[Event] = []
    done = threading.Event()
    holder: dict[str, Any] = {}

    def sink(record: JobRecord, event: Event) -> None:
        events.append(event)
        if cancel_after is not None and event.type == cancel_after and "cancelled" not in holder:
            holder["cancelled"] = True
            holder["manager"].cancel(record.job_id)
        if event.terminal:
            done.set()

    manager = JobManager(sink, job_prefix="merge-test")
    holder["manager"] = manager
    manager.submit(kind, model)
    assert done.wait(timeout), f"job did not finish in {timeout} s; events: {[e.type for e in events]}"
    manager.close(grace_s=5)
    return events


def terminal(events: list[Event]) -> Event:
    last = events[-1]
    assert last.terminal, [e.type for e in events]
    return last


def make_lora_adapter(base: Path, out: Path, *, seed: int, r: int = 4, **lora: Any) -> Path:
    """A LoRA adapter with random (non-zero) A and B on every linear layer of ``base``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lora.setdefault("target_modules", "all-linear")
        cfg = LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False, **lora)
        peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(str(out))
    return out


def make_qlora_adapter(base: Path, out: Path, *, steps: int = 4) -> Path:
    """Train a LoRA on the 4-bit NF4 base for a few optimizer steps (QLoRA) and save the adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(str(base), quantization_config=quant, device_map="cpu")
    assert model.config.quantization_config is not None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-2)
        for _ in range(steps):
            loss = peft_model(input_ids=BATCH, labels=BATCH).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
    moved = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert any(p.abs().max() > 0 for p in moved), "training did not move the adapter"
    peft_model.save_pretrained(str(out))
    return out


def logits_of(model_dir: Path, *adapters: Path, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Logits on BATCH of ``model_dir`` with ``adapters`` applied in order through peft (not merged
    into the weights, except that each adapter is folded in before the next one is applied)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    for i, adapter in enumerate(adapters):
        model = PeftModel.from_pretrained(model, str(adapter))
        if i < len(adapters) - 1:
            model = model.merge_and_unload()
    model.eval()
    with torch.no_grad():
        return model(input_ids=BATCH).logits.float()


def merged_logits(model_dir: Path) -> torch.Tensor:
    """Logits of a merged model loaded with plain transformers (it must need no peft)."""
    from transformers import AutoModelForCausalLM

    assert not (model_dir / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    assert "Peft" not in type(model).__name__
    model.eval()
    with torch.no_grad():
        return model(input_ids=BATCH).logits.float()


def staging_leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}."))
