"""Packing must not change what is learned: per-example losses, padded (A) vs packed (C), same weights.

The plain script (A) tokenizes with ``apply_chat_template`` and pads with
``DataCollatorForSeq2Seq``; the worker (C) tokenizes with its own data pipeline and flattens a
batch into one row with restarting ``position_ids``. With A's trained adapter loaded once, the
same examples go through both paths; token ids and labels must be identical, and so must each
example's mean loss, up to float reordering.
"""

from __future__ import annotations

import itertools
import json
import tempfile
from pathlib import Path

from bench.common import Options, Row

EXAMPLES = 16
TOLERANCE = 1e-4  # relative; FACTS.md measured logits agreeing to 7e-7


def per_example_losses(
    model_dir: Path, data: Path, adapter_dir: Path, n: int = EXAMPLES
) -> dict[str, object]:
    import torch
    import torch.nn.functional as F
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

    from bench.hf_baseline import tokenize
    from finetune_worker.config.data import DataConfig
    from finetune_worker.training.data import build_datasets, make_collator

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()[:n]]

    script_rows = [tokenize(row, tokenizer) for row in rows]
    with tempfile.TemporaryDirectory(prefix="bench-losscheck-") as tmp:
        subset = Path(tmp) / "subset.jsonl"
        subset.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        cfg = DataConfig(format="instruction", max_seq_length=512, packing=True)
        worker_rows, _, _ = build_datasets(cfg, tokenizer, subset, validation_split=0, seed=42)
    same_tokens = len(worker_rows) == len(script_rows) and all(
        w["input_ids"] == list(s["input_ids"]) and w["labels"] == list(s["labels"])
        for w, s in zip(worker_rows, script_rows, strict=True)
    )

    base = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, attn_implementation="sdpa"
    )
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        padded = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)(script_rows)
        logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        losses_a = [
            F.cross_entropy(logits[i, :-1], padded["labels"][i, 1:], ignore_index=-100).item()
            for i in range(len(script_rows))
        ]

        flat = make_collator(tokenizer, True)(worker_rows)
        # use_cache=False: with the cache on, transformers drops the per-example mask (FACTS.md).
        logits = model(
            input_ids=flat["input_ids"], position_ids=flat["position_ids"], use_cache=False
        ).logits[0]
        labels = flat["labels"][0]
        token_loss = F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="none")
        starts = [*(flat["position_ids"][0] == 0).nonzero().flatten().tolist(), labels.numel()]
        losses_c = []
        for begin, end in itertools.pairwise(starts):
            # Position t predicts label t+1: an example's predictions are t in [begin, end - 1).
            span_labels = labels[begin + 1 : end]
            keep = span_labels != -100
            losses_c.append(token_loss[begin : end - 1][keep].mean().item())
    worst = max(abs(a - c) / abs(a) for a, c in zip(losses_a, losses_c, strict=True))
    return {"same_tokens": same_tokens, "a": losses_a, "c": losses_c, "max_rel_diff": worst}


def per_example_rows(opts: Options, model_dir: Path, data: Path, adapter_dir: Path) -> list[Row]:
    n = 4 if opts.quick else EXAMPLES
    result = per_example_losses(model_dir, data, adapter_dir, n)
    worst = float(result["max_rel_diff"])  # type: ignore[arg-type]
    same = bool(result["same_tokens"])
    return [
        Row(
            "train",
            f"per-example loss, A's padded batch vs C's packed batch ({n} examples, A's trained adapter)",
            f"max rel. diff {worst:.1e}",
            "token ids and labels identical" if same else "token ids or labels DIFFER",
            target=f"<= {TOLERANCE:g}, same tokens",
            met=same and worst <= TOLERANCE,
            data=result,
        )
    ]
