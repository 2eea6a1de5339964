"""One key type per map, over every event type and every reply the worker sends (docs/protocol.md, "Maps").

Every job kind runs in one real worker (training with an evaluation block, checkpoints and
TensorBoard; evaluate with a comparison model; generate; a LoRA merge; a MergeKit merge; a job
that fails on a bad row; a cancelled and a queued one), and every API call is made, each reply
and event taken exactly as decoded. Each map must be a record (all keys atoms, each one in
``events.RECORD_KEYS``) or a table (all keys binaries, found only under a ``TABLE_KEYS`` key or
below another table), never both; and the worker must not have dropped a record key it did not
know.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conftest import DATA, rows_with_bad_row
from finetune_worker.testing import WorkerHarness
from finetune_worker.wire import Atom
from finetune_worker.wire.vocabulary import EVENT_TYPES, RECORD_KEYS, TABLE_KEYS


def check_maps(term: Any, where: str, in_table: bool = False) -> list[str]:
    """Every breach of the record/table rule in ``term``, each naming its place."""
    problems: list[str] = []
    if isinstance(term, dict):
        atoms = [k for k in term if isinstance(k, Atom)]
        others = [k for k in term if not isinstance(k, Atom)]
        if atoms and others:
            problems.append(
                f"{where}: atom keys {sorted(atoms)[:4]} beside binary keys {sorted(map(str, others))[:4]}"
            )
        if atoms and in_table:
            problems.append(f"{where}: a record {sorted(atoms)[:4]} inside a table")
        if others and not in_table and term:
            problems.append(f"{where}: binary keys {sorted(map(str, others))[:4]} outside a table")
        unknown = [k for k in atoms if k not in RECORD_KEYS]
        if unknown:
            problems.append(f"{where}: record keys {unknown} not in events.RECORD_KEYS")
        for key, value in term.items():
            table = in_table or (isinstance(key, Atom) and key in TABLE_KEYS)
            problems += check_maps(value, f"{where}.{key}", table)
    elif isinstance(term, (list, tuple)):
        for i, item in enumerate(term):
            problems += check_maps(item, f"{where}[{i}]", in_table)
    return problems


def test_the_rule_itself_can_fail() -> None:
    assert check_maps({Atom("step"): 1, "loss": 2.0}, "x")
    assert check_maps({Atom("summary"): {"runtime_s": 1.0}}, "x")
    assert check_maps({Atom("metrics"): {Atom("loss"): 1.0}}, "x")
    assert check_maps({Atom("not_a_record_key"): 1}, "x")
    assert not check_maps({Atom("metrics"): {"loss": 1.0, "nested": {"a": 1}}, Atom("step"): 1}, "x")


@pytest.fixture(scope="module")
def second_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from finetune_worker.testing.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-b") / "model", seed=1)


def _call_raw(w: WorkerHarness, function: str, *args: Any) -> Any:
    call_id = w.next_id()
    reply = w.call_raw(
        (Atom("C"), call_id, Atom("finetune_worker"), Atom(function), list(args)), expect_id=call_id
    )
    assert reply is not None
    return reply.term


def test_every_event_and_reply_follows_the_map_rule(
    tiny_model_dir: Path, second_model: Path, tmp_path: Path
) -> None:
    train = {
        "job": "train",
        "model_name": str(tiny_model_dir),
        "output_dir": str(tmp_path / "lora"),
        "dataset": {"path": str(DATA / "conversations.jsonl"), "validation_split": 0.1},
        "data": {"max_seq_length": 96},
        "peft": {"method": "lora", "r": 4, "alpha": 8},
        "training_parameters": {"batch_size": 4, "logging_steps": 1},
        "max_steps": 4,
        "checkpoint": {"every_steps": 2, "keep": 1},
        "eval": {"every_steps": 2},
        "evaluation": {"max_rows": 2, "samples": 1, "generation": {"max_new_tokens": 3}},
        "tracking": {"tensorboard": True},
        "loss_weights": {"classes": {"The lime is green.": 0.5}},  # its class_counts table
        "seed": 3,
    }
    evaluate = {
        "job": "evaluate",
        "model_path": str(tiny_model_dir),
        "adapter_path": str(tmp_path / "lora"),
        "compare_model_path": str(tiny_model_dir),
        "dataset": {"path": str(DATA / "qa.jsonl")},
        "max_rows": 3,
        "generation": {"max_new_tokens": 3},
        "output_dir": str(tmp_path / "eval"),
    }
    generate = {
        "job": "generate",
        "model_path": str(tiny_model_dir),
        "adapter_path": str(tmp_path / "lora"),
        "prompts": ["The cat", [{"role": "user", "content": "Hi"}]],
        "max_new_tokens": 3,
        "output_dir": str(tmp_path / "gen"),
    }
    merge_lora = {
        "base_model_path": str(tiny_model_dir),
        "adapter_path": str(tmp_path / "lora"),
        "output_path": str(tmp_path / "merged"),
    }
    yaml_path = tmp_path / "linear.yaml"
    yaml_path.write_text(
        f"models:\n  - model: {tiny_model_dir}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {second_model}\n    parameters: {{weight: 0.5}}\nmerge_method: linear\ndtype: float32\n"
    )
    mergekit = {
        "yaml_config_path": str(yaml_path),
        "output_dir": str(tmp_path / "linear"),
        "cpu_offload": True,
    }
    kto = {  # a preference run: its scores and the data's label counts
        **{k: v for k, v in train.items() if k not in ("evaluation", "tracking", "eval", "loss_weights")},
        "dataset": {"path": str(DATA / "kto.jsonl"), "validation_split": 0.05},
        "preference": {"method": "kto", "eval_rows": 4},
        "output_dir": str(tmp_path / "kto"),
        "max_steps": 2,
    }
    unanswered = {  # a GRPO job whose reward_request nobody answers: failed after 1 s
        **kto,
        "dataset": {"path": str(DATA / "qa.jsonl"), "validation_split": 0},
        "preference": {
            "method": "grpo",
            "max_completion_length": 4,
            "rewards": [{"type": "beam", "timeout_s": 1}],
        },
        "output_dir": str(tmp_path / "grpo"),
    }
    sweep = {  # a sweep's trials table and best values (tables: the keys are config keys)
        "job": "sweep",
        "train": {
            **{k: v for k, v in train.items() if k not in ("evaluation", "tracking", "loss_weights", "job")},
            "output_dir": str(tmp_path / "sweep"),
            "max_steps": 2,
        },
        "search_space": {"training_parameters.learning_rate": {"type": "categorical", "choices": [1e-3]}},
        "trials": 1,
    }
    bad_rows = rows_with_bad_row(tmp_path / "bad.jsonl", {"question": "no answer"})
    failing = {
        **train,
        "dataset": {"path": str(bad_rows)},
        "output_dir": str(tmp_path / "bad"),
        "evaluation": None,
    }
    failing.pop("tracking")

    with WorkerHarness(test_jobs=True) as w:
        terms: list[tuple[str, Any]] = []
        ends = []
        # One at a time: the later jobs read the adapter the first one writes (checked at submit).
        for config in (train, evaluate, generate, merge_lora, mergekit, kto, sweep, unanswered, failing):
            reply = _call_raw(w, "submit", json.dumps(config), w.pid)
            terms.append(("submit reply", reply))
            assert reply[2][0] == "ok", reply
            ends.append(w.wait_for(reply[2][1], "terminal", timeout=600)[-1])
        assert [e.type for e in ends] == ["completed"] * 7 + ["failed"] * 2, [e.payload for e in ends]
        long = _call_raw(
            w, "submit", json.dumps({"job": "test_steps", "steps": 10_000, "step_seconds": 0.01}), w.pid
        )
        queued = _call_raw(w, "submit", json.dumps({"job": "test_steps", "steps": 1}), w.pid)
        long_id, queued_id = long[2][1], queued[2][1]
        w.wait_for(long_id, "progress", timeout=30)
        terms.append(("status reply", _call_raw(w, "status", long_id)))
        terms.append(("cancel reply", _call_raw(w, "cancel", queued_id)))
        terms.append(("cancel reply", _call_raw(w, "cancel", long_id)))
        w.wait_for(long_id, "terminal", timeout=30)
        for function, args in [
            ("ping", ()),
            ("info", ()),
            ("jobs", ()),
            ("validate", (json.dumps(train),)),
            ("validate", (json.dumps({"job": "train", "training_parameters": {"learning_rate": -1}}),)),
            ("submit", ('{"job": "merge"}', w.pid)),
            ("status", ("no-such-job",)),
            ("cancel", ("no-such-job",)),
            ("no_such_function", ()),
            ("status", (42,)),
        ]:
            terms.append((f"{function} reply", _call_raw(w, function, *args)))
        events = list(w.event_log)
        stderr = w.stderr_text()

    seen_types = {e.type for e in events}
    assert seen_types == EVENT_TYPES, f"not covered: {sorted(EVENT_TYPES - seen_types)}"
    tables_seen = set()
    problems: list[str] = []
    for event in events:
        payload = event.term[3]
        problems += check_maps(payload, f"{event.type} event")
        tables_seen |= {str(k) for k in _keys_deep(payload) if k in TABLE_KEYS}
    for what, term in terms:
        problems += check_maps(term, what)
        tables_seen |= {str(k) for k in _keys_deep(term) if k in TABLE_KEYS}
    assert problems == [], "\n".join(problems[:30])
    assert tables_seen == TABLE_KEYS, f"tables never sent: {sorted(TABLE_KEYS - tables_seen)}"
    assert "not in events.RECORD_KEYS" not in stderr, stderr[-3000:]


def _keys_deep(term: Any) -> list[Any]:
    if isinstance(term, dict):
        return [k for k in term] + [k for v in term.values() for k in _keys_deep(v)]
    if isinstance(term, (list, tuple)):
        return [k for v in term for k in _keys_deep(v)]
    return []
