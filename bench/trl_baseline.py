"""A peer: TRL's ``SFTTrainer`` as its documentation shows it, with Liger kernels where CUDA is.

The rows become TRL's conversational prompt-completion form (the user turn as the prompt, the
answer as the completion), so its defaults train on the completion only, as the worker and the
plain script do; the model gets the same LoRA (r=8, alpha 16, dropout 0.05, all linear layers)
through ``peft_config``. Everything else is ``SFTConfig``'s default: padded batches in a shuffled
order (no packing, no padding-free batches, which TRL supports only with flash attention), except
what must match the other runs (steps, batch, learning rate and schedule, seed, optimizer, no
saving, no gradient checkpointing) and ``use_liger_kernel`` on CUDA (Liger's kernels are Triton: GPU only). Its result line
is the plain script's (``bench.hf_baseline``).

    python -m bench.trl_baseline --model M --data rows.jsonl --output out --steps 40 [--liger]
"""

from __future__ import annotations

import argparse
import sys

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from bench.hf_baseline import run_arguments, train_and_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--method", choices=["lora"], default="lora", help="as the plain script's; LoRA only")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--liger", action="store_true", help="use_liger_kernel (needs CUDA)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(
        args.model,
        dtype=torch.bfloat16 if args.precision == "bf16" else torch.float32,
        attn_implementation="sdpa",
    )
    dataset = load_dataset("json", data_files=args.data, split="train")
    dataset = dataset.map(prompt_completion, remove_columns=dataset.column_names)
    config = SFTConfig(
        **run_arguments(args, cuda),
        max_length=1024,  # above the longest row: nothing is truncated
        # SFTConfig turns gradient checkpointing on by default; the other runs (the worker, the plain
        # script, LLaMA-Factory as the bench sets it) do not recompute: compare like with like.
        gradient_checkpointing=False,
        use_liger_kernel=args.liger,
    )
    lora = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=lora
    )
    train_and_report(trainer, args.method, cuda)
    return 0


def prompt_completion(row: dict) -> dict:
    """An instruction row as TRL's conversational prompt-completion example."""
    user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    return {
        "prompt": [{"role": "user", "content": user}],
        "completion": [{"role": "assistant", "content": row["output"]}],
    }


if __name__ == "__main__":
    sys.exit(main())
