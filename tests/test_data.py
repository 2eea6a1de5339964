"""The data pipeline: file formats, row validation, chat masks, truncation, split and collators."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from finetune_worker.config.data import DataConfig
from finetune_worker.errors import JobFailed
from finetune_worker.hf import CHATML_TEMPLATE as CHAT_TEMPLATE
from finetune_worker.training.data import IGNORE_INDEX, ChatEncoder, build_datasets, make_collator
from finetune_worker.training.data_collate import PaddedCollator

DATA = Path(__file__).resolve().parents[1] / "configs" / "data"
PLAIN_CHATML = CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def build(tok: Any, path: Path, split: float = 0.0, seed: int = 0, **cfg: Any) -> tuple[list, list, dict]:
    train, held, stats = build_datasets(DataConfig(**cfg), tok, path, validation_split=split, seed=seed)
    return list(train), list(held), stats


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def labelled(tok: Any, row: dict[str, list[int]]) -> str:
    return tok.decode(
        [i for i, lab in zip(row["input_ids"], row["labels"], strict=True) if lab != IGNORE_INDEX]
    )


# ---- config ----


def test_design_data_section_validates_as_written() -> None:
    cfg = DataConfig.model_validate(
        {"format": "auto", "train_on_responses_only": True, "max_seq_length": 1024, "packing": True}
    )
    assert (cfg.format, cfg.max_seq_length, cfg.packing, cfg.train_on_responses_only) == (
        "auto",
        1024,
        True,
        True,
    )
    for field_name, info in DataConfig.model_fields.items():
        assert info.description, f"{field_name} needs a description"
    with pytest.raises(ValidationError, match="extra_forbidden"):
        DataConfig.model_validate({"formatt": "qa"})
    with pytest.raises(ValidationError, match="max_seq_length"):
        DataConfig(max_seq_length=0)
    with pytest.raises(ValidationError, match="one of our column names"):
        DataConfig(columns={"input_text": "target_text"})
    assert DataConfig(columns={"question": "prompt", "completion": "answer"}).column_renames() == {
        "prompt": "question",
        "completion": "answer",
    }


# ---- every format loads and detects ----


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("text.txt", "text"),
        ("text.jsonl", "text"),
        ("qa.jsonl", "qa"),
        ("qa.csv", "qa"),
        ("instruction.jsonl", "instruction"),
        ("conversations.jsonl", "conversations"),
        ("sharegpt.jsonl", "conversations"),
    ],
)
def test_demo_files_load_and_detect(tok: Any, name: str, kind: str) -> None:
    path = DATA / name
    assert path.stat().st_size < 200_000
    train, held, stats = build(tok, path, split=0.1, max_seq_length=256)
    assert stats["format_counts"] == {kind: stats["rows"]}
    assert stats["rows"] >= 200
    assert len(train) == stats["train_rows"] and len(held) == stats["eval_rows"] > 0
    assert stats["tokens"] == sum(len(r["input_ids"]) for r in train + held)
    for row in train + held:
        assert (
            set(row) == {"input_ids", "labels", "length"} and len(row["input_ids"]) == len(row["labels"]) >= 2
        )
        assert row["length"] == len(row["input_ids"])
    if kind == "text":
        assert all(r["labels"] == r["input_ids"] for r in train)
    else:
        # Responses only: some tokens masked, and every labelled span ends with the end-of-turn token.
        assert 0 < stats["trained_tokens"] < stats["tokens"]
        assert labelled(tok, train[0]).endswith("<|im_end|>")
    # Explicit format gives the same result as auto.
    assert build(tok, path, split=0.1, max_seq_length=256, format=kind)[0] == train


def test_mixed_formats_detected_per_row(tok: Any, tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"text": "The sky is blue."},
            {"question": "What colour is the sky?", "answer": "The sky is blue."},
            {"instruction": "Give the opposite.", "input": "hot", "output": "cold"},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
        ],
    )
    _, _, stats = build(tok, path)
    assert stats["format_counts"] == {"conversations": 1, "instruction": 1, "qa": 1, "text": 1}


def test_json_array_and_data_object(tok: Any, tmp_path: Path) -> None:
    rows = [{"question": f"What is {i}?", "answer": f"It is {i}."} for i in range(4)]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "b.json").write_text(json.dumps({"data": rows}))
    a = build(tok, tmp_path / "a.json")[0]
    assert a == build(tok, tmp_path / "b.json")[0] and len(a) == 4
    assert labelled(tok, a[2]) == "It is 2.<|im_end|>"


def test_sharegpt_roles_map_onto_chat_roles(tok: Any, tmp_path: Path) -> None:
    chat = [("system", "Be brief."), ("user", "What sound does a cat make?"), ("assistant", "A cat meows.")]
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    share = write_jsonl(
        tmp_path / "share.jsonl", [{"conversations": [{"from": names[r], "value": c} for r, c in chat]}]
    )
    plain = write_jsonl(
        tmp_path / "plain.jsonl", [{"messages": [{"role": r, "content": c} for r, c in chat]}]
    )
    rows = build(tok, share)[0]
    assert rows == build(tok, plain)[0]
    text = tok.decode(rows[0]["input_ids"])
    assert "<|im_start|>user\nWhat sound" in text and "<|im_start|>assistant\nA cat meows." in text
    assert "human" not in text and "gpt" not in text


def test_csv_with_column_mapping(tok: Any, tmp_path: Path) -> None:
    path = tmp_path / "custom.csv"
    path.write_text(
        'id,prompt,completion\n1,What colour is snow?,Snow is white.\n2,"Name a fruit, please",An apple.\n'
    )
    rows = build(tok, path, columns={"question": "prompt", "answer": "completion"})[0]
    assert [labelled(tok, r) for r in rows] == ["Snow is white.<|im_end|>", "An apple.<|im_end|>"]
    assert "Name a fruit, please" in tok.decode(rows[1]["input_ids"])
    with pytest.raises(JobFailed) as err:
        build(tok, path)
    assert err.value.error == "bad_dataset_row"
    assert "row 1: cannot tell its format from its keys (completion, id, prompt)" in err.value.message


def test_system_prompt_added_only_where_missing(tok: Any, tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "qa.jsonl",
        [{"question": "Q1?", "answer": "A1."}, {"question": "Q2?", "answer": "A2.", "system": "Own system."}],
    )
    rows = build(tok, path, system_prompt="Default system.")[0]
    assert tok.decode(rows[0]["input_ids"]).startswith("<|im_start|>system\nDefault system.<|im_end|>")
    assert tok.decode(rows[1]["input_ids"]).startswith("<|im_start|>system\nOwn system.<|im_end|>")


def test_instruction_input_joins_the_user_turn(tok: Any, tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "i.jsonl", [{"instruction": "Give the opposite.", "input": "hot", "output": "cold"}]
    )
    row = build(tok, path)[0][0]
    assert tok.decode(row["input_ids"]) == (
        "<|im_start|>user\nGive the opposite.\n\nhot<|im_end|>\n<|im_start|>assistant\ncold<|im_end|>\n"
    )
    assert labelled(tok, row) == "cold<|im_end|>"


# ---- bad rows and files ----


def _failure(tok: Any, path: Path, **cfg: Any) -> JobFailed:
    with pytest.raises(JobFailed) as err:
        build(tok, path, **cfg)
    return err.value


def test_bad_rows_name_row_and_key(tok: Any, tmp_path: Path) -> None:
    good = {"question": "Q?", "answer": "A."}
    lines = [
        json.dumps(good),
        "",  # blank lines are skipped but still counted, as an editor counts them
        json.dumps({"question": "Q?"}),  # line 3: missing answer
        json.dumps({"question": "Q?", "answer": 7}),  # line 4: wrong type
        json.dumps({"messages": [{"role": "robot", "content": "hi"}]}),  # line 5: unknown role
        json.dumps({"messages": []}),  # line 6: empty
        "{not json",  # line 7
        json.dumps(good),
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    err = _failure(tok, path)
    assert err.error == "bad_dataset_row"
    msg = err.message
    # The message names the keys wanted and the keys found.
    assert "row 3: missing key 'answer' (a Q&A row needs question and answer; the row has question)" in msg
    assert "row 4: key 'answer' must be a string, got a number" in msg
    assert "row 5: messages[1]: unknown role 'robot'" in msg
    assert "row 6: 'messages' is empty" in msg
    assert "row 7: invalid JSON" in msg
    assert err.details["bad_rows"] == 5 and str(path) in err.hint


def test_more_bad_rows_are_counted_not_listed(tok: Any, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "many.jsonl", [{"instruction": "Do it."} for _ in range(12)])
    err = _failure(tok, path)
    assert err.message.count("missing key 'output'") == 5
    assert err.message.endswith("and 7 more bad row(s)")
    assert err.details["bad_rows"] == 12


def test_conversation_row_problems(tok: Any, tmp_path: Path) -> None:
    rows = [
        {"messages": [{"role": "user", "content": "hi"}]},  # no assistant
        {"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]},
        {"conversations": [{"from": "human", "value": ["list"]}, {"from": "gpt", "value": "x"}]},
        {"messages": "hello"},
        {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "late"}]},
        ["not", "an", "object"],
    ]
    msg = _failure(tok, write_jsonl(tmp_path / "c.jsonl", rows)).message
    assert "row 1: the conversation has no assistant message" in msg
    assert "row 2: messages[1]: missing key 'content'" in msg
    assert "row 3: conversations[1]: key 'value' must be a string, got a list" in msg
    assert "row 4: key 'messages' must be a list of messages, got a string" in msg
    assert "row 5: messages[2]: a system message must come first" in msg
    assert "and 1 more bad row(s)" in msg


def test_row_numbers_in_json_and_csv(tok: Any, tmp_path: Path) -> None:
    (tmp_path / "d.json").write_text(json.dumps([{"text": "ok"}, {"text": ""}, {"text": None}]))
    msg = _failure(tok, tmp_path / "d.json").message
    assert "row 2: key 'text' is empty" in msg and "row 3: missing key 'text'" in msg
    (tmp_path / "d.csv").write_text("question,answer\nQ1?,A1.\nQ2?,\nQ3?,A3.,extra\n")
    msg = _failure(tok, tmp_path / "d.csv").message
    assert "row 2: missing key 'answer'" in msg and "row 3: 3 values but the header has 2 columns" in msg
    msg = _failure(tok, write_jsonl(tmp_path / "f.jsonl", [{"text": "x"}]), format="qa").message
    assert msg == "row 1: missing key 'question' (a Q&A row needs question and answer; the row has text)"


def test_missing_empty_and_unknown_files(tok: Any, tmp_path: Path) -> None:
    err = _failure(tok, tmp_path / "nope.jsonl")
    assert err.error == "dataset_not_found" and "no dataset file or folder" in err.message and err.hint
    (tmp_path / "empty.jsonl").write_text("\n\n")
    err = _failure(tok, tmp_path / "empty.jsonl")
    assert err.error == "bad_dataset_row" and "is empty" in err.message
    (tmp_path / "data.parquet").write_text("x")
    err = _failure(tok, tmp_path / "data.parquet")
    assert "not a readable parquet file" in err.message and "file_format" in err.hint
    (tmp_path / "rows.unknown").write_text("a,b\n1,2\n")
    err = _failure(tok, tmp_path / "rows.unknown")
    assert (
        err.error == "invalid_config"
        and "cannot tell the format" in err.message
        and "file_format" in err.hint
    )
    (tmp_path / "rows.dat").write_text(json.dumps({"text": "hello there"}) + "\n")
    assert len(build(tok, tmp_path / "rows.dat", file_format="jsonl")[0]) == 1
    (tmp_path / "t.txt").write_text("hello")
    assert _failure(tok, tmp_path / "t.txt", format="qa").error == "invalid_config"


# ---- the responses-only mask, token by token ----

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What colour is the apple?"},
    {"role": "assistant", "content": "The apple is red."},
    {"role": "user", "content": "And the sky?"},
    {"role": "assistant", "content": "The sky is blue."},
]


def _expected(tok: Any) -> tuple[list[int], list[int]]:
    """ChatML built piece by piece, so each token's expected label is known independently."""

    def piece(text: str, trained: bool) -> list[tuple[int, bool]]:
        return [(i, trained) for i in tok(text, add_special_tokens=False)["input_ids"]]

    start, end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    out: list[tuple[int, bool]] = []
    for m in CONVERSATION:
        out += [(start, False), *piece(m["role"] + "\n", False)]
        if m["role"] == "assistant":
            out += [*piece(m["content"], True), (end, True)]  # content and end-of-turn train
        else:
            out += [*piece(m["content"], False), (end, False)]
        out += piece("\n", False)
    return [i for i, _ in out], [i if t else IGNORE_INDEX for i, t in out]


@pytest.mark.parametrize("template", ["generation_tags", "prefix_diff"])
def test_responses_only_mask_token_by_token(tok: Any, template: str) -> None:
    cfg = DataConfig(chat_template=None if template == "generation_tags" else PLAIN_CHATML)
    encoder = ChatEncoder(tok, cfg)
    assert encoder.mask_method == template
    ids, labels = encoder.encode_chat(CONVERSATION)
    want_ids, want_labels = _expected(tok)
    assert ids == want_ids
    for k, (got, want) in enumerate(zip(labels, want_labels, strict=True)):
        assert got == want, f"token {k} {tok.convert_ids_to_tokens(ids[k])!r}: label {got}, expected {want}"
    trained = [tok.decode([i]) for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
    assert "".join(trained) == "The apple is red.<|im_end|>The sky is blue.<|im_end|>"
    # Without responses-only every token trains.
    ids2, labels2 = ChatEncoder(tok, cfg.model_copy(update={"train_on_responses_only": False})).encode_chat(
        CONVERSATION
    )
    assert ids2 == ids and labels2 == ids


def test_both_mask_methods_agree_on_demo_conversations(tok: Any) -> None:
    tags, diff = ChatEncoder(tok, DataConfig()), ChatEncoder(tok, DataConfig(chat_template=PLAIN_CHATML))
    for line in (DATA / "conversations.jsonl").read_text().splitlines()[:60]:
        messages = json.loads(line)["messages"]
        assert tags.encode_chat(messages) == diff.encode_chat(messages)


def test_template_without_chat_template_falls_back_to_chatml(tok: Any) -> None:
    from copy import deepcopy

    bare = deepcopy(tok)
    bare.chat_template = None
    encoder = ChatEncoder(bare, DataConfig())
    assert encoder.template == CHAT_TEMPLATE
    assert encoder.encode_chat(CONVERSATION) == ChatEncoder(tok, DataConfig()).encode_chat(CONVERSATION)


# ---- truncation, split, text blocks ----


def test_truncation_keeps_the_start_and_counts(tok: Any) -> None:
    path = DATA / "conversations.jsonl"
    full = build(tok, path, max_seq_length=4096)[0]
    warnings: list[str] = []
    short, _, stats = build_datasets(
        DataConfig(max_seq_length=40), tok, path, validation_split=0.0, seed=0, warn=warnings.append
    )
    longer = [r for r in full if len(r["input_ids"]) > 40]
    assert stats["truncated"] == len(longer) > 0
    assert all(len(r["input_ids"]) <= 40 for r in short)
    assert stats["train_rows"] + stats["dropped"] == len(full)
    starts = {tuple(r["input_ids"][:40]) for r in full}
    assert all(tuple(r["input_ids"]) in starts for r in short)
    assert any("truncated" in w for w in warnings) and stats["warnings"] == warnings


def test_split_is_deterministic_by_seed(tok: Any) -> None:
    path = DATA / "qa.jsonl"
    a_train, a_eval, a_stats = build(tok, path, split=0.2, seed=1)
    b_train, b_eval, _ = build(tok, path, split=0.2, seed=1)
    _, c_eval, _ = build(tok, path, split=0.2, seed=2)
    assert (a_train, a_eval) == (b_train, b_eval)
    assert a_eval != c_eval
    assert a_stats["eval_rows"] == 60 and a_stats["train_rows"] == 240


def test_text_blocks(tok: Any, tmp_path: Path) -> None:
    doc = " ".join(f"The number {i} follows {i - 1}." for i in range(1, 40))
    path = tmp_path / "book.txt"
    path.write_text(f"{doc}\n\nA second short paragraph.\n")
    rows, _, stats = build(tok, path, text_block_size=16)
    whole = tok(doc)["input_ids"] + [tok.eos_token_id]
    blocks = [r["input_ids"] for r in rows]
    assert all(len(b) <= 16 for b in blocks) and len(blocks) > 5
    assert list(itertools.chain(*blocks)) == whole + tok("A second short paragraph.")["input_ids"] + [
        tok.eos_token_id
    ]
    assert stats["format_counts"] == {"text": 2} and stats["truncated"] == 0
    assert stats["trained_tokens"] == stats["tokens"] - len(blocks)


# ---- collators ----


def test_padded_collator_shapes(tok: Any) -> None:
    collator = make_collator(tok, "pad")
    assert isinstance(collator.inner, PaddedCollator) and collator.inner.pad_token_id == tok.pad_token_id
    batch = collator([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, tok.pad_token_id, tok.pad_token_id]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_packed_per_example_losses_equal_padded(tiny_model_dir: Path, tok: Any) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    rows = build(tok, DATA / "conversations.jsonl")[0][:6]
    assert len({len(r["input_ids"]) for r in rows}) > 1  # lengths differ, so padding happens

    def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ce = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none", ignore_index=IGNORE_INDEX
        )
        return ce, (labels[:, 1:] != IGNORE_INDEX).float()

    with torch.no_grad():
        padded = make_collator(tok, "pad")(rows)
        ce, mask = token_losses(
            model(**{k: padded[k] for k in ("input_ids", "attention_mask")}, use_cache=False).logits,
            padded["labels"],
        )
        padded_losses = (ce * mask).sum(1) / mask.sum(1)

        packed = make_collator(tok, "flatten")(rows)
        assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
        bounds = list(itertools.accumulate([0] + [len(r["input_ids"]) for r in rows]))

        def split_losses(logits: torch.Tensor) -> torch.Tensor:
            ce, mask = token_losses(logits, packed["labels"])
            # Token k's loss predicts label k+1: an example [s, e) owns positions s .. e-2.
            return torch.stack(
                [
                    (ce[0, s : e - 1] * mask[0, s : e - 1]).sum() / mask[0, s : e - 1].sum()
                    for s, e in itertools.pairwise(bounds)
                ]
            )

        packed_losses = split_losses(
            model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        )
        # Without position_ids the examples attend to each other: the check below can fail.
        leaky = split_losses(model(input_ids=packed["input_ids"], use_cache=False).logits)

        # Each example alone (no padding, no neighbours), and a length-grouped batch ("group"
        # mode: padded rows of similar length, the padding masked out).
        alone = []
        for row in rows:
            one = make_collator(tok, "pad")([row])
            ce1, mask1 = token_losses(
                model(input_ids=one["input_ids"], use_cache=False).logits, one["labels"]
            )
            alone.append((ce1 * mask1).sum() / mask1.sum())
        grouped = make_collator(tok, "group")(rows)
        ce_g, mask_g = token_losses(
            model(**{k: grouped[k] for k in ("input_ids", "attention_mask")}, use_cache=False).logits,
            grouped["labels"],
        )
        grouped_losses = (ce_g * mask_g).sum(1) / mask_g.sum(1)

    torch.testing.assert_close(packed_losses, padded_losses, atol=1e-5, rtol=0)
    assert (leaky - padded_losses).abs().max() > 1e-3
    torch.testing.assert_close(grouped_losses, torch.stack(alone), atol=1e-4, rtol=0)
    torch.testing.assert_close(packed_losses, torch.stack(alone), atol=1e-4, rtol=0)


def test_template_problems_are_named(tok: Any) -> None:
    # A template that numbers turns renders earlier turns differently once more follow: no prefix diff.
    unstable = "{{ messages|length }}" + PLAIN_CHATML
    with pytest.raises(JobFailed) as err:
        ChatEncoder(tok, DataConfig(chat_template=unstable)).encode_chat(CONVERSATION)
    assert err.value.error == "invalid_config" and "train_on_responses_only" in err.value.hint
    strict = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        + CHAT_TEMPLATE
    )
    with pytest.raises(JobFailed) as err:
        ChatEncoder(tok, DataConfig(chat_template=strict)).encode_chat(CONVERSATION, where="row 9")
    assert err.value.error == "bad_dataset_row"
    assert err.value.message.startswith("row 9: the chat template cannot render this conversation")
    assert "no system role" in err.value.message


def test_demo_files_match_their_generator() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_demo_data", DATA / "make_demo_data.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, text in module.build().items():
        assert (DATA / name).read_text(encoding="utf-8") == text, f"{name} drifted: rerun make_demo_data.py"
    from finetune_worker.testing.tiny import corpus_text

    assert corpus_text() == module.corpus(module.random.Random(module.CORPUS_SEED))
