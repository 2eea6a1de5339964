"""The generate job on the tiny model: streaming, determinism, stop strings, cancel, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from finetune_worker.config import parse_job_config
from finetune_worker.errors import ConfigError
from test_train_helpers import Run, run_job

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What colour is the sky?"}]


def gen_config(model: Path, **over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "job": "generate",
        "model_path": str(model),
        "prompts": ["The sky is", CHAT],
        "max_new_tokens": 24,
        "temperature": 0.9,
        "seed": 11,
    }
    cfg.update(over)
    return cfg


def tokens_by_prompt(run: Run) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = {}
    for t in run.of("token"):
        out.setdefault(t["prompt_index"], []).append(t)
    return out


def test_streamed_tokens_concatenate_to_the_completion_and_files_match(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    run = run_job(gen_config(tiny_model_dir, output_dir=str(tmp_path / "gen")))
    done = run.terminal
    assert done.type == "completed", done.payload
    assert [p["phase"] for p in run.of("phase")] == ["loading_model", "generating"]
    completions = done.payload["summary"]["completions"]
    assert [c["prompt_index"] for c in completions] == [0, 1]
    streamed = tokens_by_prompt(run)
    for c in completions:
        pieces = streamed[c["prompt_index"]]
        assert [p["index"] for p in pieces] == list(range(len(pieces)))
        assert "".join(p["text"] for p in pieces) == c["text"]
        assert c["text"] and 0 < c["tokens"] <= 24
        assert c["finish_reason"] in ("eos", "length")
    # Every token event is sent before the prompt's progress event: streaming, not a batch at the end.
    kinds = [(e.type, e.payload.get("prompt_index", e.payload.get("done"))) for e in run.events]
    assert kinds.index(("progress", 1)) > max(i for i, k in enumerate(kinds) if k == ("token", 0))
    path = Path(done.payload["outputs"]["completions_path"])
    assert path == tmp_path / "gen" / "completions.jsonl"
    assert [json.loads(line) for line in path.read_text().splitlines()] == completions
    assert completions[1]["prompt"] == CHAT


def test_same_seed_same_completion_other_seed_differs(tiny_model_dir: Path) -> None:
    def texts(**over: Any) -> list[str]:
        run = run_job(gen_config(tiny_model_dir, **over))
        assert run.terminal.type == "completed", run.terminal.payload
        return [c["text"] for c in run.terminal.payload["summary"]["completions"]]

    first = texts()
    assert texts() == first
    assert texts(seed=12) != first
    greedy = texts(temperature=0, seed=1)
    assert texts(temperature=0, seed=2) == greedy  # greedy ignores the seed


def test_stop_string_cuts_the_completion_and_the_stream(tiny_model_dir: Path) -> None:
    base = run_job(gen_config(tiny_model_dir, prompts=["The sky is"], temperature=0))
    text = base.terminal.payload["summary"]["completions"][0]["text"]
    assert len(text) > 6, text
    stop = text[3:6]  # three characters from inside the greedy completion
    run = run_job(gen_config(tiny_model_dir, prompts=["The sky is"], temperature=0, stop=[stop]))
    c = run.terminal.payload["summary"]["completions"][0]
    assert c["text"] == text[: text.index(stop)]
    assert c["finish_reason"] == "stop"
    assert "".join(t["text"] for t in run.of("token")) == c["text"]


def test_streamer_holds_back_partial_utf8_and_stop_prefixes(tiny_model_dir: Path) -> None:
    """Feed a real tokenization of multi-byte text to the streamer token by token."""
    import torch
    from transformers import AutoTokenizer

    from finetune_worker.evaluation.generation import FinalTextStreamer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    text = "Café ünïcödé 😀 日本語, then STOP here"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    # byte-level BPE really does split these characters across tokens
    assert any("\ufffd" in tok.decode(ids[:k]) for k in range(1, len(ids)))

    for stop, expected in (([], text), (["STOP"], text[: text.index("STOP")])):
        pieces: list[str] = []
        streamer = FinalTextStreamer(tok, stop, lambda row, piece, pieces=pieces: pieces.append(piece))
        streamer.put(torch.tensor([[1, 2, 3]]))  # the prompt comes first and is skipped
        for i in ids:
            streamer.put(torch.tensor([i]))
        streamer.end()
        assert all("\ufffd" not in p for p in pieces)
        assert "".join(pieces) == expected == streamer.texts[0]
        if stop:
            assert not any("S" in p for p in pieces)  # no partial stop string ever streamed


def test_cancel_stops_generation_midway(tiny_model_dir: Path) -> None:
    run = Run(gen_config(tiny_model_dir, prompts=["The sky is"] * 3, max_new_tokens=2000))
    try:
        run.wait_for("token")
        run.manager.cancel(run.job_id)
        done = run.wait(120)
    finally:
        run.close()
    assert done.type == "cancelled", done.payload
    assert len(run.of("token")) < 2000


@pytest.mark.parametrize(
    ("over", "path"),
    [
        ({"prompts": []}, "prompts"),
        ({"prompts": ["ok", ""]}, "prompts[1]"),
        (
            {"prompts": ["ok", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]]},
            "prompts[1]",
        ),
        ({"prompts": ["ok", 3]}, "prompts[1]"),
        ({"prompts": [[{"role": "robot", "content": "hi"}]]}, "prompts[0]"),
        ({"prompts": "just a string"}, "prompts"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"stop": [""]}, "stop"),
        ({"num_return_sequences": 2, "temperature": 0}, ""),
        ({"prompt": ["typo"]}, "prompt"),
    ],
)
def test_bad_generate_configs_name_the_field(tiny_model_dir: Path, over: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_job_config(gen_config(tiny_model_dir, **over))
    paths = [i.path for i in err.value.issues]
    assert any(p.startswith(path) for p in paths), (paths, str(err.value))


def test_missing_model_and_adapter_paths_are_reported_together(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        parse_job_config(
            {
                "job": "generate",
                "model_path": str(tmp_path / "nope"),
                "adapter_path": str(tmp_path),
                "prompts": ["x"],
            }
        )
    issues = {i.path: i.message for i in err.value.issues}
    assert "no local model" in issues["model_path"]
    assert "adapter_config.json" in issues["adapter_path"]


def test_kind_is_inferred_from_prompts_and_promised_names_validate(tiny_model_dir: Path) -> None:
    kind, cfg = parse_job_config(
        {
            "model_path": str(tiny_model_dir),
            "prompts": ["a", [{"role": "user", "content": "b"}]],
            "max_new_tokens": 5,
            "temperature": 0.7,
            "seed": 3,
        }
    )
    assert kind == "generate" and cfg.max_new_tokens == 5 and cfg.seed == 3


def test_4bit_base_with_adapter_generates(tiny_model_dir: Path, tmp_path: Path) -> None:
    """QLoRA-style loading: the base in 4-bit NF4 (bitsandbytes, works on CPU) plus a peft adapter."""
    from test_train_helpers import tiny_config

    adapter = tmp_path / "adapter"
    trained = run_job(tiny_config(tiny_model_dir, adapter, "qa.jsonl", max_steps=2))
    assert trained.terminal.type == "completed", trained.terminal.payload
    cfg = gen_config(
        tiny_model_dir,
        adapter_path=str(adapter),
        quantization={"bits": 4},
        prompts=[CHAT],
        temperature=0,
        max_new_tokens=8,
    )
    run = run_job(cfg)
    assert run.terminal.type == "completed", run.terminal.payload
    assert any("4-bit" in m["message"] and "adapter" in m["message"] for m in run.of("log"))
    text = run.terminal.payload["summary"]["completions"][0]["text"]
    assert "".join(t["text"] for t in run.of("token")) == text


def test_several_sequences_per_prompt_stream_separately(tiny_model_dir: Path) -> None:
    run = run_job(gen_config(tiny_model_dir, num_return_sequences=3, max_new_tokens=10))
    assert run.terminal.type == "completed", run.terminal.payload
    completions = run.terminal.payload["summary"]["completions"]
    assert [(c["prompt_index"], c["sequence"]) for c in completions] == [
        (p, s) for p in (0, 1) for s in range(3)
    ]
    assert len({c["text"] for c in completions if c["prompt_index"] == 0}) > 1  # sampled, so they differ
    for c in completions:
        pieces = [
            t
            for t in run.of("token")
            if (t["prompt_index"], t["sequence"]) == (c["prompt_index"], c["sequence"])
        ]
        assert [t["index"] for t in pieces] == list(range(len(pieces)))
        assert "".join(t["text"] for t in pieces) == c["text"]
