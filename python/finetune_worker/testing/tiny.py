"""Build a tiny Llama-architecture causal LM with its own tokenizer, offline and deterministically.

The demo (``make run``), the tests and the benchmarks need a real model that loads through
``AutoModelForCausalLM``/``AutoTokenizer`` with no model hub. This module trains a byte-level
BPE tokenizer on the corpus shipped in ``assets/corpus.txt``, initializes a ``LlamaForCausalLM``
under a fixed seed and saves both with ``save_pretrained``. Same inputs give byte-identical
``model.safetensors``. The directory is built next to its destination and renamed into place,
so an interrupted build never leaves something that looks like a complete model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from finetune_worker.hf import CHATML_TEMPLATE

Size = Literal["tiny", "small", "medium"]

BOS = "<|endoftext|>"
EOS = "<|im_end|>"  # end of turn: generation stops there, and training teaches it
PAD = "<|pad|>"  # distinct from eos so label masking by pad id never hides a trained eos
IM_START = "<|im_start|>"
SPECIAL_TOKENS = [BOS, IM_START, EOS, PAD]

MARKER = "tiny_model.json"  # written last: its presence means the directory is complete
FORMAT_VERSION = 2  # bump whenever the same size and seed would build different bytes


@dataclass(frozen=True)
class TinySpec:
    """Architecture of one size. ``vocab_size`` is the BPE target; the shipped corpus yields ~1,000."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    max_position_embeddings: int = 2048
    #: The model's vocabulary when larger than the tokenizer's (rows past it are never looked up,
    #: but the LM head computes them: a real model's cost for benchmarks).
    model_vocab: int | None = None


SIZES: dict[str, TinySpec] = {
    # ~0.6M parameters: a 60-step LoRA run takes seconds on 2 CPU cores.
    "tiny": TinySpec(1024, 128, 2, 4, 2, 384),
    # ~4.5M parameters (FACTS.md measured its ~5M cousin): for benchmarks where compute should dominate overhead.
    "small": TinySpec(1024, 256, 4, 8, 4, 1024),
    # ~58M parameters, a 32k-row LM head: for benchmarks where matrix multiplies dominate.
    "medium": TinySpec(1024, 512, 8, 8, 4, 1536, model_vocab=32_000),
}

_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MARKER)


def build_tiny_model(
    out_dir: str | os.PathLike[str], *, size: Size = "tiny", overwrite: bool = False, seed: int = 0
) -> Path:
    """Build (or reuse) a tiny model + tokenizer in ``out_dir`` and return its path.

    An existing complete tiny model of the same size and seed is returned as it is; any other
    non-empty directory is an error unless ``overwrite`` is set.
    """
    if size not in SIZES:
        raise ValueError(f"unknown tiny model size {size!r}; choose one of {', '.join(SIZES)}")
    out = Path(out_dir).expanduser().resolve()
    # model_vocab only where set: the markers of the sizes that predate it stay as they were.
    spec = {k: v for k, v in asdict(SIZES[size]).items() if v is not None}
    marker = {"format_version": FORMAT_VERSION, "size": size, "seed": seed, **spec}
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a directory")
        if any(out.iterdir()):
            existing = _read_marker(out)
            # Our own build from an older version of this module: stale, so replace it.
            stale = bool(existing) and existing.get("format_version") != FORMAT_VERSION
            if not overwrite and not stale:
                if _is_complete(out, marker):
                    return out
                what = (
                    f"a tiny model built with size={existing.get('size')!r}, seed={existing.get('seed')!r}"
                    if existing
                    else "files that are not a complete tiny model"
                )
                raise FileExistsError(
                    f"{out} already holds {what}; pass overwrite=True (--overwrite) or choose another directory"
                )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        # mkdtemp (and safetensors) make private files; a model directory is meant to be shared.
        # Fixed modes rather than the umask: reading the umask means setting it, process-wide.
        staging.chmod(0o755)
        vocab = _build_into(staging, SIZES[size], seed)
        for file in staging.iterdir():
            file.chmod(0o644)
        (staging / "README.md").write_text(_model_card(size, seed, SIZES[size], vocab), encoding="utf-8")
        (staging / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if not overwrite and _is_complete(out, marker):
            return out  # another process (a parallel test worker) built the same model meanwhile
        if out.exists():
            shutil.rmtree(out)
        try:
            os.replace(staging, out)
        except OSError:
            if _is_complete(out, marker):
                return out
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already once renamed into place
    return out


def corpus_text() -> str:
    """The English text the tokenizer learns its merges from (shipped with the package)."""
    return resources.files("finetune_worker").joinpath("assets/corpus.txt").read_text(encoding="utf-8")


def _is_complete(path: Path, marker: dict[str, object]) -> bool:
    return _read_marker(path) == marker and all((path / f).is_file() for f in _REQUIRED_FILES)


def _read_marker(path: Path) -> dict[str, object]:
    try:
        data = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _build_into(path: Path, spec: TinySpec, seed: int) -> int:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = _train_tokenizer(spec.vocab_size)
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    config = LlamaConfig(  # type: ignore[call-arg]  # rope_theta goes through **kwargs in transformers 5
        vocab_size=max(len(tokenizer), spec.model_vocab or 0),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=1e-6,
        # transformers' 0.02 caps a random head's logits near 0.02 * hidden (2.6 here), which LoRA, leaving
        # the head and norms frozen, cannot lift: the loss would stall near 5. 1/sqrt(hidden) lets it learn.
        initializer_range=spec.hidden_size**-0.5,
        rope_theta=10000.0,
        # Untied: LoRA on the LM head, merges and mergekit all treat the head as its own tensor.
        tie_word_embeddings=False,
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        pad_token_id=ids[PAD],
    )
    # Seed a private generator state: building must not depend on (or disturb) the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[PAD], max_new_tokens=64
    )
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return len(tokenizer)


def _train_tokenizer(vocab_size: int) -> Any:  # a transformers PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Byte-level: every string encodes (no unknown token), and decode(encode(s)) == s.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_text().splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=CHATML_TEMPLATE,
        model_max_length=2048,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def _model_card(size: str, seed: int, spec: TinySpec, vocab: int) -> str:
    return f"""# finetune-worker tiny model ({size})

A randomly initialized Llama-architecture causal LM built by `finetune-worker make-tiny-model`
(`finetune_worker.testing.tiny.build_tiny_model(DIR, size={size!r}, seed={seed})`), for tests, demos and
benchmarks. It knows nothing until you train it.

- Architecture: LlamaForCausalLM, {spec.num_hidden_layers} layers, hidden {spec.hidden_size},
  {spec.num_attention_heads} attention heads ({spec.num_key_value_heads} key/value), MLP {spec.intermediate_size},
  untied LM head, context {spec.max_position_embeddings}.
- Tokenizer: byte-level BPE, {vocab} tokens, trained on the English corpus shipped in
  `finetune_worker/assets/corpus.txt`. Special tokens: `{BOS}` (bos), `{IM_START}`, `{EOS}` (eos, end
  of turn), `{PAD}` (pad, distinct from eos).
- Chat template: ChatML (`<|im_start|>role\\n...<|im_end|>\\n`) with `{{% generation %}}` around assistant
  turns, so `apply_chat_template(..., return_assistant_tokens_mask=True)` works.
- Deterministic: the same size and seed give a byte-identical `model.safetensors`.
"""
