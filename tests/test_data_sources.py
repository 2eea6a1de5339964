"""The data users bring (issue 14): every file format and row shape, mixtures, streaming, quick checks.

Every file here is written in the test the way the user's other tools write it (pyarrow,
``datasets.save_to_disk``, gzip, zstd, OpenAI-style tool-calling exports, Axolotl's per-turn
weights), then read through the worker's own pipeline.
"""

from __future__ import annotations

import bz2
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cli_helpers import run_cli
from finetune_worker.config import parse_job_config
from finetune_worker.config.data import DataConfig
from finetune_worker.data.readers import resolve_files
from finetune_worker.errors import ConfigError, JobFailed
from finetune_worker.training.data import IGNORE_INDEX, ChatEncoder, build_datasets, prepare_data
from test_train_helpers import run_job, tiny_config

QA = [{"question": f"What is {i} plus {i}?", "answer": f"It is {2 * i}."} for i in range(12)]


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def jsonl(rows: list[Any]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def build(tok: Any, path: Path, **cfg: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    train, _, stats = build_datasets(
        DataConfig(**{"max_seq_length": 256, **cfg}), tok, path, validation_split=0, seed=0
    )
    return list(train), stats


def failure(tok: Any, path: Path, **cfg: Any) -> JobFailed:
    with pytest.raises(JobFailed) as info:
        build(tok, path, **cfg)
    return info.value


def trained_text(tok: Any, row: dict[str, list[int]]) -> str:
    return tok.decode(
        [t for t, lab in zip(row["input_ids"], row["labels"], strict=True) if lab != IGNORE_INDEX]
    )


# ---- 1. dataset files ---------------------------------------------------------------------------


def write_every_format(root: Path) -> dict[str, Path]:
    """The twelve QA rows in every format users bring them in."""
    import datasets
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(QA)
    out: dict[str, Path] = {}
    out["jsonl"] = root / "rows.jsonl"
    out["jsonl"].write_text(jsonl(QA))
    out["json"] = root / "rows.json"
    out["json"].write_text(json.dumps(QA, indent=2))
    out["csv"] = root / "rows.csv"
    pacsv.write_csv(table, out["csv"])
    out["tsv"] = root / "rows.tsv"
    out["tsv"].write_text("question\tanswer\n" + "".join(f"{r['question']}\t{r['answer']}\n" for r in QA))
    out["parquet"] = root / "rows.parquet"
    pq.write_table(table, out["parquet"], row_group_size=5)
    out["arrow file"] = root / "rows.arrow"
    with pa.ipc.new_file(str(out["arrow file"]), table.schema) as writer:
        writer.write_table(table, max_chunksize=5)
    out["arrow stream"] = root / "stream.arrow"
    with pa.ipc.new_stream(str(out["arrow stream"]), table.schema) as writer:
        writer.write_table(table, max_chunksize=5)
    out["save_to_disk"] = root / "saved"
    datasets.Dataset.from_list(QA).save_to_disk(str(out["save_to_disk"]))
    out["jsonl.gz"] = root / "rows.jsonl.gz"
    with gzip.open(out["jsonl.gz"], "wt") as f:
        f.write(jsonl(QA))
    out["jsonl.zst"] = root / "rows.jsonl.zst"
    with pa.output_stream(str(out["jsonl.zst"]), compression="zstd") as stream:
        stream.write(jsonl(QA).encode())
    out["csv.bz2"] = root / "rows.csv.bz2"
    out["csv.bz2"].write_bytes(bz2.compress(out["csv"].read_bytes()))
    out["no extension"] = root / "export"  # a JSONL file its tool named without an extension
    out["no extension"].write_text(jsonl(QA))
    return out


FORMATS = [
    "jsonl",
    "json",
    "csv",
    "tsv",
    "parquet",
    "arrow file",
    "arrow stream",
    "save_to_disk",
    "jsonl.gz",
    "jsonl.zst",
    "csv.bz2",
    "no extension",
]


@pytest.fixture(scope="module")
def every_format(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_every_format(tmp_path_factory.mktemp("formats"))


@pytest.mark.parametrize("name", FORMATS)
def test_every_file_format_gives_the_same_rows(tok: Any, every_format: dict[str, Path], name: str) -> None:
    rows, stats = build(tok, every_format[name])
    reference, _ = build(tok, every_format["jsonl"])
    assert stats["rows"] == 12 and stats["format_counts"] == {"qa": 12}
    assert rows == reference  # same tokens, same labels, same order
    assert trained_text(tok, rows[3]) == "It is 6.<|im_end|>"


def test_plain_text_files(tok: Any, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("First document\nstill first.\n\nSecond document.\n")
    rows, stats = build(tok, tmp_path / "notes.txt")
    assert stats["rows"] == 2 and stats["format_counts"] == {"text": 2}
    assert tok.decode(rows[0]["input_ids"]).startswith("First document\nstill first.")


def test_a_folder_of_files_all_splits_or_one(tok: Any, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "hub-layout"
    (folder / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(QA[:6]), folder / "data" / "train-00000-of-00002.parquet")
    (folder / "data" / "train-00001-of-00002.jsonl").write_text(jsonl(QA[6:10]))
    (folder / "data" / "test-00000-of-00001.jsonl").write_text(jsonl(QA[10:]))
    (folder / "README.md").write_text("# a dataset card, not data\n")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x.jsonl").write_text("not read")

    files = resolve_files(folder, split="train")
    assert [f.label for f in files] == [
        "hub-layout/data/train-00000-of-00002.parquet",
        "hub-layout/data/train-00001-of-00002.jsonl",
    ]
    # Without a split every file is read (the dataset card is not), with a warning.
    warnings: list[str] = []
    source = DataConfig().source(folder, "dataset")
    data = prepare_data(DataConfig(), tok, [source], seed=0, warn=warnings.append)
    assert data.stats["format_counts"] == {"qa": 12}
    assert any("holds the splits test, train; all were read" in w for w in warnings)
    one = DataConfig().source(folder, "dataset", split="train")
    assert prepare_data(DataConfig(), tok, [one], seed=0).stats["rows"] == 10
    with pytest.raises(
        JobFailed, match=r"no file of split 'validation'.*its files are of the splits test, train"
    ):
        prepare_data(DataConfig(), tok, [DataConfig().source(folder, "dataset", split="validation")], seed=0)


def test_a_saved_dataset_dict_reads_the_named_split(tok: Any, tmp_path: Path) -> None:
    import datasets

    saved = tmp_path / "dict"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(QA[:9]), "test": datasets.Dataset.from_list(QA[9:])}
    ).save_to_disk(str(saved))
    cfg = DataConfig()
    assert prepare_data(cfg, tok, [cfg.source(saved, "dataset", split="train")], seed=0).stats["rows"] == 9
    assert prepare_data(cfg, tok, [cfg.source(saved, "dataset", split="test")], seed=0).stats["rows"] == 3
    with pytest.raises(JobFailed, match="has no split 'dev'; it has train, test"):
        prepare_data(cfg, tok, [cfg.source(saved, "dataset", split="dev")], seed=0)


def test_bad_rows_in_columnar_and_compressed_files_are_numbered(tok: Any, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [*QA[:4], {"question": None, "answer": "orphan"}, *QA[4:]]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "bad.parquet")
    err = failure(tok, tmp_path / "bad.parquet")
    assert err.error == "bad_dataset_row"
    assert (
        "row 5: missing key 'question' (a Q&A row needs question and answer; the row has answer; question null)"
        in err.message
    )
    lines = jsonl(QA[:2]) + "{broken\n" + jsonl(QA[2:])
    with gzip.open(tmp_path / "bad.jsonl.gz", "wt") as f:
        f.write(lines)
    assert "row 3: invalid JSON" in failure(tok, tmp_path / "bad.jsonl.gz").message
    (tmp_path / "trunc.jsonl.gz").write_bytes(gzip.compress(lines.encode())[:40])
    err = failure(tok, tmp_path / "trunc.jsonl.gz")
    assert err.error == "bad_dataset_row" and "trunc.jsonl.gz" in err.message


# ---- 2. row shapes ------------------------------------------------------------------------------

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TOOL_ROW = {
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
        {"role": "assistant", "content": "It is 21 C in Paris."},
    ],
    "tools": [WEATHER_TOOL],
}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_openai_tool_calls_render_with_the_template_and_train_the_calls(tok: Any, tmp_path: Path) -> None:
    said_and_called = {
        "messages": [
            {"role": "user", "content": "And in Oslo?"},
            {
                "role": "assistant",
                "content": "Let me check.",
                "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
                ],
            },
            {"role": "tool", "content": {"temp_c": -3}},  # a structured result
            {"role": "assistant", "content": "It is -3 C."},
        ],
        "tools": json.dumps([WEATHER_TOOL]),  # a JSON-string column, as glaive/xlam exports have
    }
    path = tmp_path / "tools.jsonl"
    path.write_text(jsonl([TOOL_ROW, said_and_called]))
    rows, stats = build(tok, path, max_seq_length=1024)  # tool schemas make long prompts
    assert stats["format_counts"] == {"conversations": 2}
    full = tok.decode(rows[0]["input_ids"])
    assert (
        '"name": "get_weather", "description": "Current weather in a city"' in full
    )  # the schema, in the prompt
    assert '<|im_start|>tool\n{"temp_c": 21}<|im_end|>' in full
    # Trained: the call and the answer; not the user's question, not the tool's result.
    assert trained_text(tok, rows[0]) == f"{CALL}<|im_end|>It is 21 C in Paris.<|im_end|>"
    # String content with tool_calls keeps both.
    oslo = CALL.replace("Paris", "Oslo")
    assert trained_text(tok, rows[1]) == f"Let me check.\n{oslo}<|im_end|>It is -3 C.<|im_end|>"
    assert '{"temp_c": -3}' in tok.decode(rows[1]["input_ids"])


def test_a_template_that_cannot_render_tools_is_refused_naming_the_row(tok: Any, tmp_path: Path) -> None:
    no_tools = (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') "
        "+ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    path = tmp_path / "tools.jsonl"
    path.write_text(jsonl([QA[0], TOOL_ROW]))
    err = failure(tok, path, chat_template=no_tools, max_seq_length=1024)
    assert err.error == "bad_dataset_row"
    assert err.message.startswith("tools.jsonl row 2: the chat template does not render tool use")
    assert "chatml" in err.hint
    rows, _ = build(tok, path, chat_template="chatml", max_seq_length=1024)  # the built-in one does
    assert CALL in tok.decode(rows[1]["input_ids"])


def test_sharegpt_function_calls_and_observations(tok: Any, tmp_path: Path) -> None:
    row = {
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {
                "from": "function_call",
                "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}}),
            },
            {"from": "observation", "value": '{"temp_c": 21}'},
            {"from": "gpt", "value": "It is 21 C in Paris."},
        ],
        "tools": json.dumps([WEATHER_TOOL["function"]]),  # LLaMA-Factory lists bare function schemas
    }
    (tmp_path / "sharegpt.jsonl").write_text(jsonl([row]))
    rows, _ = build(tok, tmp_path / "sharegpt.jsonl", max_seq_length=1024)
    assert trained_text(tok, rows[0]) == f"{CALL}<|im_end|>It is 21 C in Paris.<|im_end|>"


def test_input_output_conversation_turns(tok: Any, tmp_path: Path) -> None:
    row = {
        "conversations": [{"input": "Hi there.", "output": "Hello!"}, {"input": "Bye.", "output": "See you."}]
    }
    (tmp_path / "io.jsonl").write_text(jsonl([row]))
    rows, stats = build(tok, tmp_path / "io.jsonl")
    assert stats["format_counts"] == {"conversations": 1}
    assert trained_text(tok, rows[0]) == "Hello!<|im_end|>See you.<|im_end|>"
    assert "<|im_start|>user\nBye.<|im_end|>" in tok.decode(rows[0]["input_ids"])


@pytest.mark.parametrize("template", ["tags", "plain"])
def test_per_turn_training_flags_decide_what_trains(tok: Any, tmp_path: Path, template: str) -> None:
    from finetune_worker.hf import CHATML_TEMPLATE

    plain = None  # the tokenizer's own template, with {% generation %} tags
    if template == "plain":
        plain = CHATML_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    rows = [
        {  # Axolotl's weight: the first answer is context only
            "messages": [
                {"role": "user", "content": "Say one."},
                {"role": "assistant", "content": "Two.", "weight": 0},
                {"role": "user", "content": "Wrong, say one."},
                {"role": "assistant", "content": "One.", "weight": 1},
            ]
        },
        {  # train: true on a user turn trains it too
            "messages": [
                {"role": "user", "content": "Echo me.", "train": True},
                {"role": "assistant", "content": "Echo me."},
            ]
        },
        {
            "conversations": [
                {"input": "Old question.", "output": "Old answer.", "train": False},
                {"input": "Q.", "output": "A."},
            ]
        },
        {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y", "weight": 0}]},
    ]
    path = tmp_path / "flags.jsonl"
    path.write_text(jsonl(rows[:3]))
    built, _ = build(tok, path, chat_template=plain)
    assert trained_text(tok, built[0]) == "One.<|im_end|>"
    assert trained_text(tok, built[1]) == "<|im_start|>user\nEcho me.<|im_end|>Echo me.<|im_end|>"
    assert trained_text(tok, built[2]) == "A.<|im_end|>"
    # Without train_on_responses_only everything trains except the flagged-off turn.
    everything, _ = build(tok, path, chat_template=plain, train_on_responses_only=False)
    assert "Two." not in trained_text(tok, everything[0]) and "Say one." in trained_text(tok, everything[0])
    path.write_text(jsonl(rows[3:]))
    err = failure(tok, path)
    assert "row 1: every assistant turn is marked not to train" in err.message
    path.write_text(
        jsonl(
            [
                {
                    "messages": [
                        {"role": "user", "content": "x"},
                        {"role": "assistant", "content": "y", "weight": 0.5},
                    ]
                }
            ]
        )
    )
    assert "'weight' must be 0 or 1" in failure(tok, path).message


def test_errors_name_the_keys_wanted_and_the_keys_found(tok: Any, tmp_path: Path) -> None:
    rows = [
        {"conversations": [{"prompt": "x", "completion": "y"}]},
        {"conversations": [{"input": "x"}]},
        {
            "messages": [
                {"role": "user", "content": "x"},
                {"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "x"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}],
                },
            ]
        },
        {"instruction": "Do it.", "response": "Done."},
    ]
    (tmp_path / "bad.jsonl").write_text(jsonl(rows))
    message = failure(tok, tmp_path / "bad.jsonl").message
    assert (
        "row 1: conversations[1]: no role: a message needs role and content (OpenAI), from and value (ShareGPT), or input and output; it has completion, prompt"
        in message
    )
    assert (
        "row 2: conversations[1]: missing key 'output' (an input/output turn needs both; it has input)"
        in message
    )
    assert (
        "row 3: messages[2].tool_calls[1]: needs a function name (function.name); it has function" in message
    )
    assert "row 4: messages[2].tool_calls[1]: arguments are not valid JSON" in message
    assert (
        "row 5: missing key 'output' (an instruction row needs instruction and output (input is optional); the row has instruction, response)"
        in message
    )


# ---- 3. mixtures --------------------------------------------------------------------------------


def marked(name: str, n: int) -> list[dict[str, str]]:
    return [{"question": f"{name} question {i}?", "answer": f"{name} answer {i}."} for i in range(n)]


def origin(tok: Any, row: dict[str, list[int]]) -> str:
    text = tok.decode(row["input_ids"])
    return "alpha" if "alpha" in text else "beta"


def mixture(tmp_path: Path, a: dict[str, Any], b: dict[str, Any], **section: Any) -> Any:
    (tmp_path / "alpha.jsonl").write_text(jsonl(marked("alpha", 40)))
    (tmp_path / "beta.jsonl").write_text(jsonl(marked("beta", 40)))
    cfg = tiny_config(
        tmp_path / "model-unused",
        tmp_path / "out",
        dataset={
            "sources": [
                {"path": str(tmp_path / "alpha.jsonl"), **a},
                {"path": str(tmp_path / "beta.jsonl"), **b},
            ],
            "validation_split": 0,
            **section,
        },
    )
    from finetune_worker.config.train import TrainConfig

    return TrainConfig.model_validate(cfg)


def test_weights_set_the_sampling_proportions(tok: Any, tmp_path: Path) -> None:
    cfg = mixture(tmp_path, {"weight": 3}, {"weight": 1, "name": "general"})
    data = prepare_data(cfg.data, tok, cfg.sources, seed=cfg.seed)
    origins = [origin(tok, r) for r in data.train]
    assert (origins.count("alpha"), origins.count("beta")) == (60, 20)  # 80 rows, 3:1
    alpha, beta = data.stats["sources"]
    assert (alpha["name"], alpha["rows"], alpha["train_rows"], alpha["sequences"]) == (
        "alpha.jsonl",
        40,
        60,
        60,
    )
    assert (beta["name"], beta["train_rows"]) == ("general", 20)
    assert alpha["share"] + beta["share"] == pytest.approx(1.0, abs=1e-3) and alpha["share"] > 0.7
    # Subsampled rows are distinct; oversampled ones are whole copies plus a seeded extra half.
    betas = [tok.decode(r["input_ids"]) for r in data.train if origin(tok, r) == "beta"]
    assert len(set(betas)) == 20
    again = prepare_data(cfg.data, tok, cfg.sources, seed=cfg.seed)
    assert list(again.train) == list(data.train)  # seeded: the same mixture every time
    other = prepare_data(cfg.data, tok, cfg.sources, seed=cfg.seed + 1)
    assert list(other.train) != list(data.train)


def test_repeat_counts_and_held_out_rows_per_source(tok: Any, tmp_path: Path) -> None:
    cfg = mixture(tmp_path, {"repeat": 2}, {"repeat": 0.5, "validation_split": 0.25})
    data = prepare_data(cfg.data, tok, cfg.sources, seed=cfg.seed)
    origins = [origin(tok, r) for r in data.train]
    assert (origins.count("alpha"), origins.count("beta")) == (80, 15)  # beta: 30 training rows, halved
    assert [origin(tok, r) for r in data.eval] == ["beta"] * 10
    held = {tok.decode(r["input_ids"]) for r in data.eval}
    assert not held & {tok.decode(r["input_ids"]) for r in data.train}


def test_mixture_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_job_config(
            {
                "model_name": str(tmp_path),
                "output_dir": str(tmp_path / "o"),
                "dataset": [{"path": "a.jsonl", "weight": 1}, {"path": "b.jsonl", "repeat": 2}],
            }
        )
    text = str(info.value)
    assert "dataset.sources[1].weight: weights are proportions of the mixture" in text
    assert "dataset.sources[0].path: no dataset file or folder" in text
    with pytest.raises(ConfigError, match="with sources, set format on each source"):
        parse_job_config(
            {"model_name": ".", "output_dir": "o", "dataset": {"sources": [{"path": "a"}], "format": "qa"}}
        )


def test_loss_weight_scales_each_sources_tokens_in_the_loss(
    tiny_model_dir: Path, tok: Any, tmp_path: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, TrainingArguments

    from finetune_worker.training.data import make_collator
    from finetune_worker.training.trainer import AtomicCheckpointTrainer

    cfg = mixture(tmp_path, {"loss_weight": 2.0}, {"loss_weight": 0.0})
    data = prepare_data(cfg.data, tok, cfg.sources, seed=cfg.seed)
    assert data.train.column_names == ["input_ids", "labels", "length", "loss_weight"]
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    trainer = AtomicCheckpointTrainer(
        model=model,
        args=TrainingArguments(output_dir=str(tmp_path / "t"), report_to="none", use_cpu=True),
        keep=1,
    )
    rows = [data.train[i] for i in (0, 1, 2, 3, 40, 41, 42, 43)]  # alpha's rows come first, then beta's
    for packing in (True, False):
        batch = make_collator(tok, packing)(rows)
        weights = batch["token_weights"]
        assert weights.shape == batch["input_ids"].shape
        model.train()
        with torch.no_grad():
            plain = {k: v for k, v in batch.items() if k != "token_weights"}
            logits = model(**{k: v for k, v in plain.items() if k != "labels"}).logits
            targets = plain["labels"][..., 1:]
            nll = torch.nn.functional.cross_entropy(
                logits[..., :-1, :].reshape(-1, logits.shape[-1]),
                targets.reshape(-1),
                reduction="none",
                ignore_index=-100,
            )
            expected = (nll * weights[..., 1:].reshape(-1)).sum() / (targets != -100).sum()
            got = trainer.compute_loss(model, dict(batch))
        assert float(got) == pytest.approx(float(expected), rel=1e-5)
        beta_rows = [origin(tok, r) == "beta" for r in rows]
        assert any(beta_rows) and not all(beta_rows)


def test_a_mixture_trains_and_reports_each_source(tiny_model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "alpha.jsonl").write_text(jsonl(marked("alpha", 30)))
    (tmp_path / "beta.parquet").parent.mkdir(exist_ok=True)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(marked("beta", 30)), tmp_path / "beta.parquet")
    out = tmp_path / "run"
    cfg = tiny_config(
        tiny_model_dir,
        out,
        dataset=[
            {"path": str(tmp_path / "alpha.jsonl"), "weight": 0.7, "name": "qa"},
            {"path": str(tmp_path / "beta.parquet"), "weight": 0.3, "name": "general", "validation_split": 0},
        ],
        max_steps=4,
    )
    run = run_job(cfg)
    assert run.terminal.type == "completed", run.terminal.payload
    data = run.terminal.payload["summary"]["data"]
    qa, general = data["sources"]
    # qa holds 3 of its 30 rows out (the default 0.1), general none: 57 training rows, shared 0.7/0.3.
    assert (qa["name"], qa["rows"], qa["eval_rows"], general["eval_rows"]) == ("qa", 30, 3, 0)
    assert (qa["train_rows"], general["train_rows"]) == (round(0.7 * 57), round(0.3 * 57)) == (40, 17)
    assert data["eval_rows"] == 3 and data["train_rows"] == 57
    assert [p["phase"] for p in run.of("phase")][:2] == ["preparing_data", "loading_model"]
    assert any(log["message"].startswith("sources: qa 40 rows") for log in run.of("log"))
    assert not (out / ".data-cache").exists()  # the tokenized data goes once the run completes


# ---- 4. streaming and the cache -----------------------------------------------------------------


def test_token_rows_are_memory_mapped_from_the_cache_and_reused(tok: Any, tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(jsonl(QA * 50))
    cfg = DataConfig(max_seq_length=64)
    source = cfg.source(path, "dataset", validation_split=0.1)
    cache = tmp_path / "cache"
    first = prepare_data(cfg, tok, [source], seed=3, cache_dir=cache)
    assert not first.from_cache and len(first.train) == 540 and len(first.eval) == 60
    assert [Path(f["filename"]).name for f in first.train.cache_files] == ["train.arrow"]
    second = prepare_data(cfg, tok, [source], seed=3, cache_dir=cache)
    assert second.from_cache and list(second.train) == list(first.train) and second.stats == first.stats
    # Another seed, or a changed file, is other data: rebuilt, and the old cache goes.
    path.write_text(jsonl(QA * 49))
    third = prepare_data(cfg, tok, [source], seed=3, cache_dir=cache)
    assert not third.from_cache and third.stats["rows"] == 588
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 1


def test_a_file_changed_between_the_passes_is_reported(
    tok: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from finetune_worker.training import data as data_module

    path = tmp_path / "rows.jsonl"
    path.write_text(jsonl(QA))
    real_scan = data_module.scan_sources

    def scan_then_grow(*args: Any) -> Any:
        counts = real_scan(*args)
        with path.open("a") as f:
            f.write(jsonl(QA[:1]))
        return counts

    monkeypatch.setattr(data_module, "scan_sources", scan_then_grow)
    with pytest.raises(JobFailed, match="changed while it was being read"):
        build(tok, path)


# ---- 5. validate without the model --------------------------------------------------------------


def test_validate_checks_the_data_with_no_model_and_reports_everything_at_once(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = pa.schema([(name, pa.string()) for name in ("question", "answer", "prompt", "completion")])
    pq.write_table(
        pa.Table.from_pylist([*QA[:3], {"prompt": "a", "completion": "b"}, *QA[3:]], schema=columns),
        tmp_path / "train.parquet",
    )
    (tmp_path / "extra.jsonl").write_text(jsonl(QA))
    (tmp_path / "data.bin").write_bytes(b"\x00\x01binary")
    (tmp_path / "job.json").write_text(
        "{\n"
        f'  "model_name": "{tmp_path / "no-model"}",\n'
        f'  "output_dir": "{tmp_path / "out"}",\n'
        '  "training_parameters": {\n'
        '    "learning_rate": 0\n'
        "  },\n"
        '  "dataset": [\n'
        '    {"path": "train.parquet"},\n'
        '    {"path": "extra.jsonl"},\n'
        '    {"path": "missing.jsonl"},\n'
        '    {"path": "data.bin"}\n'
        "  ]\n"
        "}\n"
    )
    result = run_cli("validate", "job.json", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    out = result.stdout
    assert "training_parameters.learning_rate (line 5): Input should be greater than 0" in out
    assert "model_name (line 2): no local model" in out
    assert (
        "dataset.sources[0].path (line 8): row 4: missing key 'question' (a Q&A row needs question and answer; "
        "the row has completion, prompt; answer, question null) (the first bad row among the first 100)"
    ) in out
    assert "dataset.sources[2].path (line 10): no dataset file or folder" in out
    assert "dataset.sources[3].path (line 11): cannot tell the format of data.bin" in out
    assert "sources[1]" not in out
    # validate never imports torch or transformers: it answers in a second, on any machine.
    probe = (
        "import sys; from finetune_worker.config import parse_job_config\n"
        "try:\n    parse_job_config(('file', 'job.json'))\nexcept Exception:\n    pass\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "python")}
    shown = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert shown.stdout.strip() == "[]", shown.stderr


# ---- 6. YAML configs ----------------------------------------------------------------------------


def test_yaml_configs_validate_run_and_report_lines(tiny_model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "qa.jsonl").write_text(jsonl(QA * 3))
    yaml_text = f"""\
# A training job, Axolotl-style YAML
model_name: {tiny_model_dir}
output_dir: {tmp_path / "out"}
dataset:
  - path: qa.jsonl
    validation_split: 0.2
data:
  max_seq_length: 64
training_parameters:
  batch_size: 4
  learning_rate: 5e-3   # YAML 1.1 reads this as a string; the schema reads it as a number
max_steps: 2
"""
    (tmp_path / "job.yaml").write_text(yaml_text)
    as_json = {
        "model_name": str(tiny_model_dir),
        "output_dir": str(tmp_path / "out"),
        "dataset": [{"path": "qa.jsonl", "validation_split": 0.2}],
        "data": {"max_seq_length": 64},
        "training_parameters": {"batch_size": 4, "learning_rate": 5e-3},
        "max_steps": 2,
    }
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert parse_job_config(("file", "job.yaml")) == parse_job_config(as_json)
    finally:
        os.chdir(cwd)
    result = run_cli("run", "job.yaml", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()

    (tmp_path / "bad.yaml").write_text(
        yaml_text.replace("batch_size: 4", "batch_size: -4").replace("max_steps: 2", "max_step: 2")
    )
    out = run_cli("validate", "bad.yaml", cwd=tmp_path).stdout
    assert "training_parameters.batch_size (line 10): Input should be greater than 0" in out
    assert "max_step (line 12): unknown key" in out
    (tmp_path / "broken.yaml").write_text("model_name: x\n  bad indent: [\n")
    out = run_cli("validate", "broken.yaml", cwd=tmp_path).stdout
    assert "invalid YAML in broken.yaml: malformed YAML at line 2" in out


def test_yaml_sent_as_text_on_the_wire(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    text = f"model_name: {tmp_path / 'model'}\noutput_dir: {tmp_path / 'o'}\ndataset:\n  path: {tmp_path / 'x.jsonl'}\n"
    with pytest.raises(ConfigError) as info:
        parse_job_config(text)
    assert [(i.path, i.line) for i in info.value.issues] == [("dataset.path", 4)]
    assert info.value.issues[0].to_dict()["line"] == 4
    with pytest.raises(ConfigError, match="not a file name"):
        parse_job_config("job.yaml")


def test_encoder_counts_match_the_rows(tok: Any, tmp_path: Path) -> None:
    from finetune_worker.data.sources import load_examples

    cfg = DataConfig(max_seq_length=32)
    path = tmp_path / "mixed.jsonl"
    long_text = " ".join(f"word{i}" for i in range(80))  # several blocks of 32 tokens
    path.write_text(jsonl([QA[0], {"text": long_text}, QA[1]]))
    examples = load_examples(cfg.source(path, "dataset"))
    rows, counts = ChatEncoder(tok, cfg).encode_all(examples)
    assert len(rows) > 3  # the text became several blocks
    assert counts["tokens"] == sum(len(r["input_ids"]) for r in rows)
    trained = [sum(1 for lab in r["labels"][1:] if lab != IGNORE_INDEX) for r in rows]
    assert counts["trained_tokens"] == sum(trained)
    assert 0 < counts["trained_tokens"] < counts["tokens"]  # the QA prompts do not train
    assert ChatEncoder(tok, cfg).encode_all([]) == (
        [],
        {"tokens": 0, "trained_tokens": 0, "truncated": 0, "dropped": 0},
    )


def test_evaluation_sets_read_every_format_too(every_format: dict[str, Path]) -> None:
    from finetune_worker.data.sources import load_examples

    cfg = DataConfig()
    for name in ("parquet", "save_to_disk", "jsonl.zst"):
        examples = load_examples(cfg.source(every_format[name], "dataset"), limit=5)
        assert [e.row for e in examples] == [1, 2, 3, 4, 5]
        assert examples[2].messages[-1] == {"role": "assistant", "content": "It is 4."}
    bad = every_format["jsonl"].parent / "bad-eval.jsonl"
    bad.write_text(jsonl([*QA[:3], {"question": "no answer"}, *QA[3:]]))
    assert len(load_examples(cfg.source(bad, "dataset"), limit=3)) == 3  # the bad row is past the limit
    with pytest.raises(JobFailed, match="row 4: missing key 'answer'"):
        load_examples(cfg.source(bad, "dataset"))


def test_tokenizing_many_rows_reports_progress(tok: Any, tmp_path: Path) -> None:
    from finetune_worker.training.data import PROGRESS_ROWS

    cfg = DataConfig(max_seq_length=64)
    big = tmp_path / "big.jsonl"
    big.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(PROGRESS_ROWS)))
    calls: list[tuple[int, int]] = []
    prepare_data(
        cfg,
        tok,
        [cfg.source(big, "dataset", validation_split=0.01)],
        seed=0,
        progress=lambda d, t: calls.append((d, t)),
    )
    assert calls and calls[-1] == (PROGRESS_ROWS, PROGRESS_ROWS), calls
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)

    small = tmp_path / "small.jsonl"
    small.write_text(jsonl(QA))
    quiet: list[tuple[int, int]] = []
    prepare_data(cfg, tok, [cfg.source(small, "dataset")], seed=0, progress=lambda d, t: quiet.append((d, t)))
    assert quiet == []  # ready before a progress bar would matter


# ---- gaps found in review: files named at tokenization, per-source counts, odd cells ---------------


def test_errors_found_at_tokenization_name_the_file_of_a_folder(tok: Any, tmp_path: Path) -> None:
    no_tools = "{% for m in messages %}{{ m['role'] + ': ' + (m['content'] or '') + '\\n' }}{% endfor %}"
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "part-0.jsonl").write_text(jsonl(QA[:3]))
    (folder / "part-1.jsonl").write_text(jsonl([QA[3], TOOL_ROW]))
    err = failure(tok, folder, chat_template=no_tools, max_seq_length=1024)
    assert err.message.startswith("export/part-1.jsonl row 2: the chat template does not render tool use")
    # A row that fails to parse names its file too.
    (folder / "part-1.jsonl").write_text(jsonl([QA[3], {"question": "no answer"}]))
    err = failure(tok, folder)
    assert "export/part-1.jsonl row 2: missing key 'answer'" in err.message


def test_each_source_reports_its_rows_and_tokens(tok: Any, tmp_path: Path) -> None:
    cfg = mixture(tmp_path, {"repeat": 2}, {})
    data = prepare_data(cfg.data, tok, cfg.sources, seed=cfg.seed)
    alpha, beta = data.stats["sources"]
    by_origin: dict[str, list[dict[str, list[int]]]] = {"alpha": [], "beta": []}
    for row in data.train:
        by_origin[origin(tok, row)].append(row)
    for stat, rows in ((alpha, by_origin["alpha"]), (beta, by_origin["beta"])):
        assert stat["sequences"] == len(rows)
        assert stat["tokens"] == sum(len(r["input_ids"]) for r in rows)
        assert stat["trained_tokens"] == sum(
            sum(1 for lab in r["labels"][1:] if lab != IGNORE_INDEX) for r in rows
        )
    assert alpha["sequences"] == 2 * beta["sequences"] == 80
    total = alpha["trained_tokens"] + beta["trained_tokens"]
    assert alpha["share"] == pytest.approx(alpha["trained_tokens"] / total, abs=1e-3)


def test_a_source_with_both_weight_and_repeat_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"dataset.sources\[0\].repeat: set weight or repeat, not both"):
        parse_job_config(
            {
                "model_name": str(tmp_path),
                "output_dir": str(tmp_path / "o"),
                "dataset": [{"path": "a.jsonl", "weight": 2, "repeat": 2}, {"path": "b.jsonl", "weight": 1}],
            }
        )


def test_json_cells_in_csv_and_openai_content_parts(tok: Any, tmp_path: Path) -> None:
    import csv

    messages = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Name a "}, {"type": "text", "text": "colour."}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]},
    ]
    with (tmp_path / "chats.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["messages"])
        writer.writerow([json.dumps(messages)])  # spreadsheets and pandas keep lists as JSON text
    rows, stats = build(tok, tmp_path / "chats.csv")
    assert stats["format_counts"] == {"conversations": 1}
    assert "Name a colour." in tok.decode(rows[0]["input_ids"])
    assert trained_text(tok, rows[0]) == "Blue.<|im_end|>"
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]}, messages[1]]
    (tmp_path / "image.jsonl").write_text(jsonl([{"messages": messages}, {"messages": image}]))
    err = failure(tok, tmp_path / "image.jsonl")
    assert "row 2" in err.message and "messages[1]: content part 1 is 'image_url'" in err.message


def test_validate_names_a_dataset_that_is_not_a_regular_file(tiny_model_dir: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "rows.jsonl"
    os.mkfifo(fifo)  # a pipe would block a reader for ever; root may read any file, so chmod cannot stand in
    cfg = tiny_config(tiny_model_dir, tmp_path / "out", dataset={"path": str(fifo)})
    with pytest.raises(ConfigError) as info:
        parse_job_config(cfg)
    text = str(info.value)
    assert "dataset.path" in text and "rows.jsonl: not a regular file" in text
