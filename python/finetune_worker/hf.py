"""Hugging Face pieces every job kind shares: is a folder a causal LM, its tokenizer and chat
template, bitsandbytes load settings.

Imported only on the runner thread (transformers is heavy); the failures name the config field
at fault (``key``), so training, evaluation and merges report the same problem the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finetune_worker.errors import JobFailed

#: ChatML, with tool use in the Hermes/Qwen style. ``{% generation %}`` marks what the assistant
#: says (content, tool calls, end of turn), so ``apply_chat_template(return_assistant_tokens_mask=True)``
#: yields the responses-only mask. With ``tools=`` the tool schemas go into the system turn; an
#: assistant's ``tool_calls`` become ``<tool_call>`` JSON blocks; ``tool`` turns keep their role.
#: Conversations without tools render exactly as plain ChatML.
CHATML_TEMPLATE = (
    "{% if tools %}"
    "{{ '<|im_start|>system\\n' }}"
    "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}{% endif %}"
    "{{ 'You can call these tools (JSON schemas):\\n<tools>\\n' }}"
    "{% for tool in tools %}{{ tool | tojson }}{{ '\\n' }}{% endfor %}"
    '{{ \'</tools>\\nTo call one, answer with <tool_call>{"name": ..., "arguments": {...}}</tool_call>.<|im_end|>\\n\' }}'
    "{% endif %}"
    "{% for message in messages %}"
    "{% if not (tools and loop.first and message['role'] == 'system') %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}"
    "{{ message['content'] or '' }}"
    "{% for call in message['tool_calls'] or [] %}"
    "{% if message['content'] or not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<tool_call>\\n' }}{{ {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson }}"
    "{{ '\\n</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}"
    "{{ message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

#: Templates ``data.chat_template`` may name instead of giving Jinja text.
NAMED_TEMPLATES = {"chatml": CHATML_TEMPLATE}


def chat_template(value: str | None) -> str | None:
    """A ``data.chat_template`` value as Jinja text (a name from NAMED_TEMPLATES, or the text)."""
    return NAMED_TEMPLATES.get(value, value) if value else value


def causal_lm_hint(key: str) -> str:
    return (
        f"Point {key} at a local Hugging Face causal-LM directory (config.json with a model_type "
        "transformers knows, e.g. llama, mistral, qwen2, plus its weights and tokenizer)."
    )


def unsupported_model(key: str, path: str | Path, why: str) -> JobFailed:
    return JobFailed("unsupported_model", f"{key} '{path}': {why}", hint=causal_lm_hint(key))


def model_not_found(key: str, path: str | Path) -> JobFailed:
    return JobFailed(
        "model_not_found",
        f"{key}: no local model at '{path}'; this worker loads models from local paths (no hub access)",
        hint="Download the model on a machine with hub access (huggingface-cli download) and copy the "
        "directory here, or build the demo model with `finetune-worker make-tiny-model DIR`.",
    )


def check_causal_lm(path: Path, key: str) -> Any:
    """The model's transformers config, or a named failure: a missing directory, no config.json,
    an architecture transformers does not know, or one without a causal-LM head."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if not path.is_dir():
        raise model_not_found(key, path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise unsupported_model(key, path, "no config.json, so this is not a transformers model directory")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except ValueError as exc:
        raise unsupported_model(key, path, f"config.json is not valid JSON ({exc})") from exc
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (ValueError, KeyError, OSError) as exc:
        raise unsupported_model(
            key, path, f"model_type {model_type!r} is not an architecture transformers knows"
        ) from exc
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise unsupported_model(
            key, path, f"model_type {model_type!r} has no causal language-model head (AutoModelForCausalLM)"
        )
    return config


def load_tokenizer(path: Path, key: str) -> Any:
    """The tokenizer saved in ``path``, with a pad token (EOS when it has none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as exc:
        raise unsupported_model(
            key, path, f"cannot load its tokenizer ({type(exc).__name__}: {exc})"
        ) from exc
    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and labels, so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def ensure_chat_template(tokenizer: Any, override: str | None) -> None:
    """The override if given; ChatML when the tokenizer has none (what training does too)."""
    if override:
        tokenizer.chat_template = chat_template(override)
    elif not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE


def bnb_config(q: Any, compute_dtype: Any) -> Any:
    """The bitsandbytes load config of a ``quantization`` section (4-bit NF4/FP4 or 8-bit)."""
    from transformers import BitsAndBytesConfig

    if q.bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.quant_type,
            bnb_4bit_use_double_quant=q.use_double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def keep_4bit_layout_trainable(model: Any) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference in a model we train.

    bitsandbytes 0.50.2, CPUs with AVX512-BF16: the first ``Linear4bit.forward`` in eval mode
    (any evaluation before or during training) repacks the weight into a CPU inference layout
    for good (``_convert_weight_packed_for_cpu``); every later matmul, in training too, goes
    through ``gemv_4bit``, which has no autograd kernel, so the gradients that flow through the
    frozen base to the LoRA weights are silently wrong (torch warns once: "an autograd kernel
    was not registered"). The repack only runs when ``support_avx512bf16_for_cpu`` is set, so
    clearing that flag keeps the trainable layout; inference outside training keeps the fast
    path. CUDA never takes this branch (it needs ``x.device.type == "cpu"``).
    ``tests/test_train_correctness.py`` tells when a bitsandbytes release no longer needs this.
    Returns the number of layers changed.
    """
    try:
        from bitsandbytes.nn.modules import Linear4bit
    except ImportError:
        return 0
    changed = 0
    for module in model.modules():
        if isinstance(module, Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed
