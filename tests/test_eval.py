"""The evaluate job on the tiny model: before/after a real fine-tune, masking, formats, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conftest import PAST_PREVIEW, rows_with_bad_row
from finetune_worker.config import parse_job_config
from finetune_worker.errors import ConfigError
from test_train_helpers import DATA, Run, run_job, tiny_config

#: Short answers the tiny model can memorise in a few dozen LoRA steps.
TOY_QA = [
    ("What colour is the sky?", "Blue."),
    ("What sound does a cat make?", "Meow."),
    ("What is the capital of France?", "Paris."),
    ("How many legs does a spider have?", "Eight."),
    ("What do bees make?", "Honey."),
    ("What is frozen water called?", "Ice."),
]


def eval_config(model: Path, data: Path, **over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "job": "evaluate",
        "model_path": str(model),
        "dataset": {"path": str(data)},
        "generation": {"max_new_tokens": 8},
    }
    cfg.update(over)
    return cfg


@pytest.fixture(scope="module")
def toy_qa(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("toy") / "toy_qa.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in TOY_QA))
    return path


@pytest.fixture(scope="module")
def memorised_adapter(tiny_model_dir: Path, toy_qa: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter trained by the real training job on the toy Q&A set until it knows it."""
    out = tmp_path_factory.mktemp("toy") / "adapter"
    cfg = tiny_config(
        tiny_model_dir,
        out,
        dataset={"path": str(toy_qa), "validation_split": 0},
        peft={"method": "lora", "r": 16, "alpha": 32, "dropout": 0.0},
        training_parameters={"epochs": 1, "batch_size": 6, "learning_rate": 1e-2, "logging_steps": 10},
        max_steps=40,
        checkpoint={"every_steps": 1000, "keep": 1},
    )
    run = run_job(cfg, timeout=600)
    assert run.terminal.type == "completed", run.terminal.payload
    return out


def test_fine_tune_lowers_perplexity_and_raises_exact_match(
    tiny_model_dir: Path, toy_qa: Path, memorised_adapter: Path, tmp_path: Path
) -> None:
    out = tmp_path / "eval"
    run = run_job(
        eval_config(
            tiny_model_dir,
            toy_qa,
            adapter_path=str(memorised_adapter),
            compare_model_path=str(tiny_model_dir),
            output_dir=str(out),
        )
    )
    done = run.terminal
    assert done.type == "completed", done.payload
    summary = done.payload["summary"]
    result, base = summary["metrics"], summary["compare"]["metrics"]
    assert result["perplexity"] < base["perplexity"], (result["perplexity"], base["perplexity"])
    assert result["exact_match"] > base["exact_match"]
    assert summary["improvement"]["perplexity_reduction_pct"] > 0
    assert summary["improvement"]["exact_match_delta"] > 0
    assert result["rows"] == result["answered_rows"] == len(TOY_QA)
    assert summary["compare"]["model_path"] == str(tiny_model_dir)

    # one eval event per model, with the numbers of the summary
    evals = run.of("eval")
    assert [e["model"] for e in evals] == ["model", "compare"]
    assert evals[0]["metrics"]["perplexity"] == result["perplexity"]
    assert evals[1]["metrics"]["eval_loss"] == base["eval_loss"]
    assert {"loading_model", "evaluating", "generating", "saving"} <= {p["phase"] for p in run.of("phase")}

    # files: metrics.json is the summary; predictions.jsonl has a scored row per source row
    assert json.loads((out / "metrics.json").read_text()) == summary
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rows] == list(range(1, len(TOY_QA) + 1))
    assert [r["reference"] for r in rows] == [a for _, a in TOY_QA]
    assert sum(r["exact_match"] for r in rows) / len(rows) == pytest.approx(result["exact_match"], abs=1e-3)
    for r in rows:
        assert {"prediction", "compare_prediction", "loss", "compare_loss", "f1", "bleu", "rouge_l"} <= set(r)
        assert r["prompt"].endswith("<|im_start|>assistant\n")


def test_training_output_dir_works_as_model_path(
    tiny_model_dir: Path, toy_qa: Path, memorised_adapter: Path
) -> None:
    """model_path may point at the adapter itself; its base comes from adapter_config.json."""
    direct = run_job(eval_config(memorised_adapter, toy_qa, generate_answers=False))
    explicit = run_job(
        eval_config(tiny_model_dir, toy_qa, adapter_path=str(memorised_adapter), generate_answers=False)
    )
    a, b = direct.terminal.payload["summary"]["metrics"], explicit.terminal.payload["summary"]["metrics"]
    assert a["eval_loss"] == pytest.approx(b["eval_loss"], abs=1e-6)
    assert "exact_match" not in a  # generate_answers false: loss only


def test_loss_uses_trainings_response_mask(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The per-row loss equals the model's own loss over the row's assistant tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune_worker.config.data import DataConfig
    from finetune_worker.training.data import ChatEncoder

    data = tmp_path / "conv.jsonl"
    messages = [
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Four."},
        {"role": "user", "content": "And three plus three?"},
        {"role": "assistant", "content": "Six."},
    ]
    data.write_text(json.dumps({"messages": messages}) + "\n")
    run = run_job(eval_config(tiny_model_dir, data, output_dir=str(tmp_path / "out")))
    assert run.terminal.type == "completed", run.terminal.payload
    row = json.loads((tmp_path / "out" / "predictions.jsonl").read_text())
    assert row["reference"] == "Six."  # the last assistant turn is the reference answer
    assert "And three plus three?" in row["prompt"] and "Four." in row["prompt"]

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    ids, labels = ChatEncoder(tok, DataConfig()).encode_chat(messages)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item()
    assert row["loss"] == pytest.approx(expected, abs=1e-5)
    assert row["tokens"] == sum(1 for x in labels[1:] if x != -100)
    assert run.terminal.payload["summary"]["metrics"]["eval_loss"] == pytest.approx(expected, abs=1e-5)


def test_text_rows_get_loss_only_and_formats_mix(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "mixed.jsonl"
    data.write_text(
        json.dumps({"text": "The cat sat on the mat. The dog sat on the log."})
        + "\n"
        + json.dumps({"instruction": "Say what colour it is.", "input": "grass", "output": "green"})
        + "\n"
    )
    run = run_job(eval_config(tiny_model_dir, data, output_dir=str(tmp_path / "out")))
    result = run.terminal.payload["summary"]["metrics"]
    assert result["rows"] == 2 and result["answered_rows"] == 1
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert rows[0]["kind"] == "text" and "prediction" not in rows[0] and rows[0]["tokens"] > 10
    assert rows[1]["kind"] == "instruction" and rows[1]["reference"] == "green"


def test_max_rows_and_csv(tiny_model_dir: Path) -> None:
    run = run_job(eval_config(tiny_model_dir, DATA / "qa.csv", max_rows=3, generate_answers=False))
    assert run.terminal.type == "completed", run.terminal.payload
    assert run.terminal.payload["summary"]["metrics"]["rows"] == 3
    assert run.terminal.payload["outputs"] == {}  # no output_dir: no files


def test_bad_row_fails_naming_the_row(tiny_model_dir: Path, tmp_path: Path) -> None:
    early = tmp_path / "early.jsonl"
    early.write_text('{"question": "q", "answer": "a"}\n{"question": "only a question"}\n')
    with pytest.raises(ConfigError, match="row 2: missing key 'answer'"):
        parse_job_config(eval_config(tiny_model_dir, early))  # validate reads the first rows
    data = rows_with_bad_row(tmp_path / "bad.jsonl", {"question": "only a question"})
    run = run_job(eval_config(tiny_model_dir, data))
    done = run.terminal
    assert done.type == "failed"
    assert done.payload["error"] == "bad_dataset_row" and f"row {PAST_PREVIEW}" in done.payload["message"]


def test_wrong_adapter_fails_with_adapter_mismatch(
    tiny_model_dir: Path, memorised_adapter: Path, tmp_path: Path, toy_qa: Path
) -> None:
    from finetune_worker.testing.tiny import build_tiny_model

    other = build_tiny_model(tmp_path / "small", size="small")
    run = run_job(eval_config(other, toy_qa, adapter_path=str(memorised_adapter)))
    assert run.terminal.type == "failed"
    assert run.terminal.payload["error"] == "adapter_mismatch", run.terminal.payload


def test_bad_evaluate_configs_report_every_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        parse_job_config(
            {
                "job": "evaluate",
                "model_path": str(tmp_path / "missing-model"),
                "dataset": {"path": str(tmp_path / "missing.jsonl")},
                "compare_model_path": str(tmp_path),
            }
        )
    issues = {i.path: i.message for i in err.value.issues}
    assert "no local model" in issues["model_path"]
    assert "no dataset file or folder" in issues["dataset.path"]
    assert "neither a model" in issues["compare_model_path"]

    with pytest.raises(ConfigError) as err:
        parse_job_config(
            {
                "job": "evaluate",
                "model_path": "m",
                "dataset": {},
                "batch_size": 0,
                "compare_adapter_path": "a",
            }
        )
    paths = {i.path for i in err.value.issues}
    assert {"dataset.path", "batch_size"} <= paths


def test_kind_inferred_and_promised_names_validate(tiny_model_dir: Path, tmp_path: Path) -> None:
    kind, cfg = parse_job_config(
        {
            "model_path": str(tiny_model_dir),
            "dataset": {"path": str(DATA / "qa.jsonl")},
            "output_dir": str(tmp_path),
        }
    )
    assert kind == "evaluate" and cfg.output_dir == str(tmp_path)


def test_cancel_between_batches(tiny_model_dir: Path) -> None:
    run = Run(eval_config(tiny_model_dir, DATA / "qa.jsonl", batch_size=2, generation={"max_new_tokens": 64}))
    try:
        run.wait_for("progress")
        run.manager.cancel(run.job_id)
        done = run.wait(120)
    finally:
        run.close()
    assert done.type == "cancelled", done.payload


def test_train_job_evaluation_section_scores_base_and_fine_tuned(
    tiny_model_dir: Path, toy_qa: Path, tmp_path: Path
) -> None:
    """The train job's `evaluation` block: before/after scores and side-by-side answers in the summary."""
    out = tmp_path / "run"
    cfg = tiny_config(
        tiny_model_dir,
        out,
        dataset={"path": str(toy_qa), "validation_split": 0},
        peft={"method": "lora", "r": 16, "alpha": 32, "dropout": 0.1},
        training_parameters={"epochs": 1, "batch_size": 6, "learning_rate": 1e-2, "logging_steps": 10},
        max_steps=40,
        checkpoint={"every_steps": 1000, "keep": 1},
        evaluation={"generation": {"max_new_tokens": 8}, "samples": 2},
    )
    run = run_job(cfg, timeout=600)
    done = run.terminal
    assert done.type == "completed", done.payload
    ev = done.payload["summary"]["evaluation"]
    assert json.loads((out / "summary.json").read_text())["evaluation"] == ev
    assert ev["rows_from"] == "training rows" and ev["rows"] == len(TOY_QA)  # nothing held out
    scores = ev["metrics"]
    assert scores["fine_tuned"]["perplexity"] < scores["base"]["perplexity"]
    assert scores["fine_tuned"]["exact_match"] > scores["base"]["exact_match"]
    assert ev["improvement"]["perplexity_reduction_pct"] > 0
    assert len(ev["samples"]) == 2
    assert {"prompt", "reference", "base", "fine_tuned"} <= set(ev["samples"][0])
    assert [e["model"] for e in run.of("eval") if "model" in e] == ["base", "fine_tuned"]

    # The standalone evaluate job on the saved adapter agrees with the in-training score.
    again = run_job(eval_config(tiny_model_dir, toy_qa, adapter_path=str(out), generate_answers=False))
    assert again.terminal.payload["summary"]["metrics"]["eval_loss"] == pytest.approx(
        scores["fine_tuned"]["eval_loss"], abs=1e-4
    )
