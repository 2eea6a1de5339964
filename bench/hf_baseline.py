"""Variant A of the training benchmark: plain Hugging Face Trainer + peft, the way most tutorials do it.

Load the model and tokenizer, wrap the model in a LoRA adapter, tokenize an instruction
dataset with the chat template (loss on the answer only), pad each batch with
``DataCollatorForSeq2Seq`` and call ``trainer.train()``. Nothing clever, on purpose: this is the
yardstick the worker is measured against. Two lines exist only for the benchmark and say so:
``include_num_input_tokens_seen`` (the Trainer's own count of real tokens, the same count the
worker reports) and the JSON result line at the end.

    python -m bench.hf_baseline --model runs/bench/small-model --data runs/bench/data/instructions.jsonl \
        --output runs/bench/a --steps 100 [--method lora|full|qlora]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch
from datasets import load_dataset
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    DataCollatorForSeq2Seq,
    Trainer,
    TrainingArguments,
)

RESULT_PREFIX = "BENCH_RESULT "


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--method", choices=["lora", "full", "qlora"], default="lora")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16 needs a GPU")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32

    # 1. Model and tokenizer.
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    quantization = None
    if args.method == "qlora":
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    model = AutoModelForCausalLM.from_pretrained(
        args.model,
        dtype=dtype,
        attn_implementation="sdpa",
        quantization_config=quantization,
        device_map=("cuda" if cuda else "cpu") if quantization else None,
    )
    model.config.use_cache = False
    if args.method == "qlora":
        # No gradient checkpointing, like the worker's default, so the rows compare like with like.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)

    # 2. LoRA on every linear layer.
    if args.method in ("lora", "qlora"):
        lora = LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"
        )
        model = get_peft_model(model, lora)

    # 3. Data: chat template, loss on the assistant's answer only.
    dataset = load_dataset("json", data_files=args.data, split="train")
    dataset = dataset.map(tokenize, fn_kwargs={"tokenizer": tokenizer}, remove_columns=dataset.column_names)
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

    # 4. Train.
    training_args = TrainingArguments(**run_arguments(args, cuda))
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=tokenizer,
    )
    train_and_report(trainer, args.method, cuda, save_to=args.output)
    return 0


def run_arguments(args: argparse.Namespace, cuda: bool) -> dict[str, Any]:
    """The ``TrainingArguments`` every baseline shares (a peer's script passes them on too)."""
    return {
        "output_dir": args.output,
        "per_device_train_batch_size": args.batch_size,
        "max_steps": args.steps,
        "learning_rate": args.learning_rate,
        "lr_scheduler_type": "linear",
        # The worker's default. transformers 5 defaults to adamw_torch_fused, which made a whole CPU
        # step about 2x slower here; B/A is meant to measure the worker, not the optimizer.
        "optim": "adamw_torch",
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": not cuda,
        "bf16": args.precision == "bf16",
        "seed": args.seed,
        "disable_tqdm": True,
        "include_num_input_tokens_seen": "non_padding",  # benchmark only: real tokens, as the worker counts them
    }


def train_and_report(trainer: Any, method: str, cuda: bool, save_to: str | None = None) -> None:
    """``trainer.train()``, timed, then (``save_to``) the model saved and the result line the harness
    reads back."""
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = trainer.train()
    train_seconds = time.perf_counter() - started
    if save_to:
        trainer.save_model(save_to)
    report = {
        "method": method,
        "steps": trainer.state.global_step,
        "train_seconds": train_seconds,
        "train_runtime": result.metrics.get("train_runtime"),
        "tokens_seen": int(trainer.state.num_input_tokens_seen),
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "peak_rss_bytes": peak_rss(),
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else None,
    }
    print(RESULT_PREFIX + json.dumps(report), flush=True)


def tokenize(row: dict, tokenizer: AutoTokenizer) -> dict:
    """One instruction row -> input ids, attention mask, and labels that train on the answer only."""
    user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
    enc = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    labels = [
        tok if keep else -100 for tok, keep in zip(enc["input_ids"], enc["assistant_masks"], strict=True)
    ]
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def peak_rss() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


if __name__ == "__main__":
    sys.exit(main())
