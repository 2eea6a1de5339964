""" "Did you mean" for unknown config keys.

An unknown key gets, in this order: the key other fine-tuning tools use for the same setting
(``lr``, ``num_train_epochs``, Axolotl's ``micro_batch_size``, LLaMA-Factory's ``cutoff_len``)
mapped onto ours; a near spelling among the keys valid at that place; the same (or a near) key
valid elsewhere in the config, with its full path (``learning_rate`` at the top level belongs
in ``training_parameters``). The valid keys come from the job's pydantic model itself, so the
suggestions cannot drift from the schema.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Sequence
from functools import cache
from typing import Any

from pydantic import BaseModel

from finetune_worker.config.paths import json_path

#: Keys of Hugging Face TrainingArguments, Axolotl, LLaMA-Factory and peft configs -> where the
#: same setting lives here (each target is used only where the job's config has it).
PEER_KEYS: dict[str, tuple[str, ...]] = {
    "lr": ("training_parameters.learning_rate",),
    "num_train_epochs": ("training_parameters.epochs",),
    "num_epochs": ("training_parameters.epochs",),
    "per_device_train_batch_size": ("training_parameters.batch_size",),
    "micro_batch_size": ("training_parameters.batch_size",),
    "train_batch_size": ("training_parameters.batch_size",),
    "per_device_eval_batch_size": ("eval.batch_size",),
    "lr_scheduler_type": ("training_parameters.lr_scheduler",),
    "optim": ("training_parameters.optimizer",),
    "bf16": ("training_parameters.precision",),
    "fp16": ("training_parameters.precision",),
    "base_model": ("model_name", "model_path"),
    "model_name_or_path": ("model_name", "model_path"),
    "model": ("model_name", "model_path"),
    "datasets": ("dataset",),
    "data_path": ("dataset.path", "dataset"),
    "sequence_len": ("data.max_seq_length",),
    "cutoff_len": ("data.max_seq_length",),
    "max_seq_len": ("data.max_seq_length",),
    "max_length": ("data.max_seq_length",),
    "sample_packing": ("data.packing",),
    "lora_r": ("peft.r",),
    "lora_rank": ("peft.r",),
    "rank": ("peft.r",),
    "lora_alpha": ("peft.alpha",),
    "lora_dropout": ("peft.dropout",),
    "lora_target": ("peft.target_modules",),
    "lora_target_modules": ("peft.target_modules",),
    "adapter": ("peft.method",),
    "finetuning_type": ("peft.method",),
    "load_in_4bit": ("quantization.bits",),
    "load_in_8bit": ("quantization.bits",),
    "save_steps": ("checkpoint.every_steps",),
    "save_total_limit": ("checkpoint.keep",),
    "eval_steps": ("eval.every_steps",),
    "resume_from_checkpoint": ("resume",),
    "output_path": ("output_dir",),
}


def suggestion(cls: type[BaseModel], loc: Sequence[str | int]) -> str | None:
    """What the unknown key at ``loc`` (a pydantic error location) most likely means, as a
    dotted path, or None."""
    if not loc or not isinstance(loc[-1], str):
        return None
    key = loc[-1]
    here, fields = _walk(cls, loc[:-1])
    paths = _all_paths(cls)
    where = ".".join(fields)
    for target in PEER_KEYS.get(key.lower(), ()):
        # Another tool's name counts at the top level and in the section the setting lives in
        # (distributed.rank is not peft.r).
        if target in paths and (not where or target.rpartition(".")[0] == where):
            return target
    if here is not None:
        close = difflib.get_close_matches(key, sorted(_fields(here)), n=1, cutoff=0.75)
        if close:
            return json_path([*loc[:-1], close[0]])
    by_leaf: dict[str, list[str]] = {}
    for path in sorted(paths, key=lambda p: (p.count("."), p)):
        by_leaf.setdefault(path.rsplit(".", 1)[-1], []).append(path)
    if key in by_leaf:
        return by_leaf[key][0]
    close = difflib.get_close_matches(key, sorted(by_leaf), n=1, cutoff=0.8)
    return by_leaf[close[0]][0] if close else None


def _fields(model: type[BaseModel]) -> set[str]:
    names = set(model.model_fields)
    names |= {f.alias for f in model.model_fields.values() if f.alias}
    return names


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    """The model a field's value is (or holds, in a list, dict value or union), if any."""
    origin = typing.get_origin(annotation)
    # Python 3.10 counts list[int] as a type, and issubclass() then raises: look at the origin first.
    if origin is None and isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if origin is None and not isinstance(annotation, types.UnionType):
        return None
    for arg in typing.get_args(annotation):
        found = _nested_model(arg)
        if found is not None:
            return found
    return None


def _walk(cls: type[BaseModel], loc: Sequence[str | int]) -> tuple[type[BaseModel] | None, list[str]]:
    """The model at ``loc`` (None past a field that holds no model) and the field names on the
    way there; list indices and pydantic's union branch tags in ``loc`` are skipped."""
    model: type[BaseModel] | None = cls
    fields: list[str] = []
    for part in loc:
        if model is None:
            break
        if isinstance(part, int) or part not in model.model_fields:
            continue
        fields.append(part)
        model = _nested_model(model.model_fields[part].annotation)
    return model, fields


@cache
def _all_paths(cls: type[BaseModel]) -> frozenset[str]:
    """Every dotted key path of ``cls``'s config (nested models included, lists looked through)."""
    out: set[str] = set()

    def visit(model: type[BaseModel], prefix: str, seen: frozenset[type[BaseModel]]) -> None:
        for name, field in model.model_fields.items():
            path = prefix + name
            out.add(path)
            nested = _nested_model(field.annotation)
            if nested is not None and nested not in seen:
                visit(nested, path + ".", seen | {nested})

    visit(cls, "", frozenset({cls}))
    return frozenset(out)
