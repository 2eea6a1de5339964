"""Preference training (issue 19): DPO, ORPO and KTO runs on the tiny model, their rows, their scores.

The runs train on ``configs/data/preference.jsonl`` / ``kto.jsonl`` (right vs wrong answers to the
demo's facts, in every shape TRL reads). What is checked is the effect: after DPO the model finds
the chosen answers more likely than the rejected ones, measured here with plain transformers and
peft on the saved adapter, independently of the worker's own scorer.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from cli_helpers import run_cli
from finetune_worker.config import parse_job_config
from finetune_worker.data.rows import PreferenceExample, RowError, RowSpec, normalize
from finetune_worker.errors import ConfigError
from test_train_helpers import DATA, Run, run_job, tiny_config

pytest.importorskip("trl", reason="preference training needs the preference extra (trl)")


def pref_config(model: Path, out: Path, method: str = "dpo", **over: Any) -> dict[str, Any]:
    data = "kto.jsonl" if method == "kto" else "preference.jsonl"
    cfg = tiny_config(
        model,
        out,
        data,
        preference={"method": method, "beta": 0.1},
        training_parameters={"epochs": 1, "batch_size": 8, "learning_rate": 5e-3, "logging_steps": 2},
        max_steps=24,
        checkpoint={"every_steps": 8, "keep": 2},
    )
    cfg["dataset"]["validation_split"] = 0.1
    cfg.update(over)
    return cfg


def tensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path))


# ---- rows -------------------------------------------------------------------------------------


PAIRED = RowSpec(format="preference")
UNPAIRED = RowSpec(format="unpaired_preference")
USER = {"role": "user", "content": "Capital of France?"}
GOOD = {"role": "assistant", "content": "Paris."}
BAD = {"role": "assistant", "content": "Rome."}


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Rome."},  # TRL standard
        {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]},  # TRL conversational
        {"chosen": [USER, GOOD], "rejected": [USER, BAD]},  # implicit prompt (TRL's ultrafeedback)
        {"prompt": "Capital of France?", "chosen": [USER, GOOD], "rejected": [USER, BAD]},  # HF H4
        {"prompt": json.dumps([USER]), "chosen": json.dumps([GOOD]), "rejected": "Rome."},  # CSV cells
        {
            "prompt": [{"from": "human", "value": "Capital of France?"}],
            "chosen": "Paris.",
            "rejected": "Rome.",
        },
    ],
)
def test_every_preference_shape_becomes_the_same_pair(row: dict[str, Any]) -> None:
    example = normalize(3, row, PAIRED)
    assert isinstance(example, PreferenceExample)
    assert (example.prompt, example.chosen, example.rejected) == ([USER], [GOOD], [BAD])


def test_kto_rows_and_system_prompts() -> None:
    example = normalize(1, {"prompt": "Capital of France?", "completion": "Rome.", "label": 0}, UNPAIRED)
    assert isinstance(example, PreferenceExample)
    assert (example.prompt, example.completion, example.label) == ([USER], [BAD], False)
    with_system = normalize(
        1,
        {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Rome."},
        RowSpec("preference", system_prompt="Be brief."),
    )
    assert isinstance(with_system, PreferenceExample)
    assert with_system.prompt == [{"role": "system", "content": "Be brief."}, USER]


@pytest.mark.parametrize(
    "row, spec, message",
    [
        (
            {"prompt": "q", "chosen": "a"},
            PAIRED,
            "row 4: missing key 'rejected' (a preference row needs chosen and rejected",
        ),
        (
            {"prompt": "q", "chosen": "a", "rejected": "a"},
            PAIRED,
            "row 4: chosen and rejected are the same answer",
        ),
        ({"chosen": "Paris.", "rejected": "Rome."}, PAIRED, "row 4: no prompt: without a 'prompt' key"),
        ({"chosen": [USER, GOOD], "rejected": [GOOD]}, PAIRED, "row 4: no prompt"),
        (
            {"prompt": [USER, GOOD], "chosen": "x", "rejected": "y"},
            PAIRED,
            "the prompt must end with the user's turn",
        ),
        (
            {"prompt": "q", "chosen": [USER], "rejected": "y"},
            PAIRED,
            "'chosen' must be the assistant's answer",
        ),
        (
            {"prompt": "q", "chosen": 3, "rejected": "y"},
            PAIRED,
            "key 'chosen' must be a string or a non-empty list",
        ),
        (
            {"prompt": "q", "completion": "a", "label": "yes"},
            UNPAIRED,
            "'label' must be true (desirable) or false",
        ),
        (
            {"prompt": "q", "completion": "a"},
            UNPAIRED,
            "missing key 'label' (a KTO row needs prompt, completion and label",
        ),
        (
            {
                "prompt": "q",
                "chosen": [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f"}}]}],
                "rejected": "y",
            },
            PAIRED,
            "tool calls and tool turns are not supported in preference rows yet",
        ),
    ],
)
def test_bad_preference_rows_are_named(row: dict[str, Any], spec: RowSpec, message: str) -> None:
    with pytest.raises(RowError) as info:
        normalize(4, row, spec)
    assert message in str(info.value)


def test_configs_check_preference_data_and_sections_before_the_model_loads(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "pairs.jsonl"
    rows = [json.loads(line) for line in (DATA / "preference.jsonl").read_text().splitlines()[:5]]
    rows[3] = {"prompt": "q", "chosen": "same", "rejected": "same"}
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = pref_config(tiny_model_dir, tmp_path / "out")
    cfg["dataset"]["path"] = str(bad)
    cfg["evaluation"] = {"max_rows": 4}
    cfg["peft"] = {"method": "prompt_tuning"}
    with pytest.raises(ConfigError) as info:
        parse_job_config(cfg)
    text = str(info.value)
    assert "row 4: chosen and rejected are the same answer" in text
    assert "evaluation: not available with preference training" in text
    assert "peft.method: preference training takes the LoRA family" in text
    # Preference rows in a supervised job: named as such.
    sft = tiny_config(tiny_model_dir, tmp_path / "sft", "preference.jsonl")
    with pytest.raises(
        ConfigError, match='they look like preference rows: train on them with a "preference" section'
    ):
        parse_job_config(sft)
    # A supervised row format under a preference section, and preference rows without one.
    with pytest.raises(
        ConfigError, match=r'preference\.method dpo trains on preference rows; leave format "auto"'
    ):
        parse_job_config({**pref_config(tiny_model_dir, tmp_path / "o2"), "data": {"format": "qa"}})
    with pytest.raises(ConfigError, match='add a "preference" section'):
        parse_job_config({**tiny_config(tiny_model_dir, tmp_path / "o3"), "data": {"format": "preference"}})


def test_a_missing_trl_names_the_preference_extra(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "trl", None)
    with pytest.raises(ConfigError) as info:
        parse_job_config(pref_config(tiny_model_dir, tmp_path / "out"))
    assert "preference.method: Preference training (DPO, ORPO, KTO) need the trl package" in str(info.value)
    assert "pip install 'finetune-worker[preference]'" in str(info.value)


# ---- DPO: the effect, measured independently ----------------------------------------------------------


def logp_margins(model: Any, tokenizer: Any, rows: list[dict[str, str]]) -> list[float]:
    """log P(chosen) - log P(rejected) of each row's answers, with plain transformers."""
    import torch

    out = []
    for row in rows:
        prompt = [{"role": "user", "content": row["prompt"]}]
        start = len(
            tokenizer.apply_chat_template(
                prompt, add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        )
        logps = []
        for answer in (row["chosen"], row["rejected"]):
            ids = tokenizer.apply_chat_template(
                [*prompt, {"role": "assistant", "content": answer}], tokenize=True, return_dict=True
            )["input_ids"]
            x = torch.tensor([ids])
            with torch.no_grad():
                logits = model(input_ids=x).logits[0, :-1].float()
            token_logps = torch.log_softmax(logits, -1).gather(-1, x[0, 1:, None]).squeeze(-1)
            logps.append(float(token_logps[start - 1 :].sum()))
        out.append(logps[0] - logps[1])
    return out


def test_dpo_makes_the_chosen_answers_the_likelier_ones(tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "dpo"
    run = run_job(pref_config(tiny_model_dir, out))
    assert run.terminal.type == "completed", run.terminal.payload
    summary = run.terminal.payload["summary"]
    pref = summary["preference"]
    base, tuned = pref["metrics"]["base"], pref["metrics"]["fine_tuned"]
    assert pref["method"] == "dpo" and base["rows"] == tuned["rows"] == 30
    assert tuned["accuracy"] > base["accuracy"] and tuned["margin"] > base["margin"] + 1.0
    assert tuned["reward_accuracy"] > 0.5  # TRL's own measure, against the reference
    assert summary["base_perplexity"] is None  # a DPO loss has no perplexity
    assert summary["data"]["format_counts"] == {"preference": 300}
    # The events: preference numbers in the metrics, one scored line per model.
    assert any("rewards/margins" in m["metrics"] for m in run.of("metrics"))
    scored = [e for e in run.of("eval") if "accuracy" in e["metrics"]]
    assert [(e["model"], e["step"]) for e in scored] == [("base", 0), ("fine_tuned", 24)]
    # The outputs hold the trained adapter only (TRL's frozen "ref" copy stays out of them).
    assert not (out / "ref").exists() and not any((c / "ref").exists() for c in out.glob("checkpoint-*"))
    card = (out / "README.md").read_text()
    assert (
        "DPO (beta 0.1)" in card
        and f"| accuracy | {base['accuracy']:.4g} | {tuned['accuracy']:.4g} |" in card
    )
    assert f"<td>accuracy</td><td>{base['accuracy']:g}</td>" in (out / "report.html").read_text()

    # Independently: plain transformers + peft on the saved adapter, every row of the file.
    rows = [
        r
        for r in map(json.loads, (DATA / "preference.jsonl").read_text().splitlines())
        if isinstance(r.get("prompt"), str)
    ]
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    before = logp_margins(model, tokenizer, rows)
    tuned_model = PeftModel.from_pretrained(model, str(out)).eval()
    after = logp_margins(tuned_model, tokenizer, rows)
    accuracy = [sum(m > 0 for m in ms) / len(ms) for ms in (before, after)]
    assert accuracy[1] > accuracy[0] + 0.1, accuracy
    assert sum(after) / len(after) > sum(before) / len(before) + 1.0


def test_our_scorer_equals_a_plain_computation(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune_worker.training.preference import preference_scores

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    rows = [
        r
        for r in map(json.loads, (DATA / "preference.jsonl").read_text().splitlines())
        if isinstance(r.get("prompt"), str)
    ][:12]
    examples = [normalize(i, r, PAIRED) for i, r in enumerate(rows, start=1)]
    scores = preference_scores(model, tokenizer, examples, max_length=256)  # type: ignore[arg-type]
    plain = logp_margins(model, tokenizer, rows)
    assert scores["margin"] == pytest.approx(sum(plain) / len(plain), abs=1e-4)
    assert scores["accuracy"] == pytest.approx(sum(m > 0 for m in plain) / len(plain), abs=1e-6)


# ---- ORPO, KTO, full fine-tuning, QLoRA ----------------------------------------------------------------


@pytest.mark.parametrize("method", ["orpo", "kto"])
def test_orpo_and_kto_train_the_adapter(tiny_model_dir: Path, tmp_path: Path, method: str) -> None:
    out = tmp_path / method
    tracking = {"tensorboard": True} if method == "kto" else None
    run = run_job(pref_config(tiny_model_dir, out, method, max_steps=12, tracking=tracking))
    assert run.terminal.type == "completed", run.terminal.payload
    adapter = tensors(out / "adapter_model.safetensors")
    lora_b = [t for name, t in adapter.items() if "lora_B" in name]
    assert lora_b and all(float(t.abs().max()) > 0 for t in lora_b)  # B starts at zero: it trained
    pref = run.terminal.payload["summary"]["preference"]
    assert pref["method"] == method and set(pref["metrics"]) == {"base", "fine_tuned"}
    if method == "kto":
        pytest.importorskip("tensorboard")
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(run.terminal.payload["summary"]["tracking"]["tensorboard"]["log_dir"])
        acc.Reload()
        tags = set(acc.Tags()["scalars"])
        assert {
            "train/loss",
            "train/rewards/margins",
            "train/kl",
            "eval/loss",
            "eval/rewards/margins",
        } <= tags
        assert "eval/perplexity" not in tags  # a KTO loss has no perplexity
        assert "preference/fine_tuned/margin" in tags
        labels = run.terminal.payload["summary"]["data"]["labels"]
        assert sum(labels.values()) == 270 and min(labels.values()) > 100
        assert {"desirable_logp", "undesirable_logp", "margin"} <= set(pref["metrics"]["fine_tuned"])
    else:
        assert any("log_odds_ratio" in m["metrics"] for m in run.of("metrics"))


def test_full_dpo_keeps_a_frozen_reference_and_qlora_dpo_trains(tiny_model_dir: Path, tmp_path: Path) -> None:
    full = run_job(pref_config(tiny_model_dir, tmp_path / "full", peft={"method": "full"}, max_steps=8))
    assert full.terminal.type == "completed", full.terminal.payload
    base, tuned = (
        tensors(tiny_model_dir / "model.safetensors"),
        tensors(tmp_path / "full" / "model.safetensors"),
    )
    changed = [k for k in base if k in tuned and not (base[k] == tuned[k]).all()]
    assert changed  # the weights moved; the reference (a frozen copy) did not move with them
    metrics = full.terminal.payload["summary"]["preference"]["metrics"]
    assert metrics["fine_tuned"]["reward_margin"] != 0.0  # the policy drifted from its reference

    qlora = run_job(pref_config(tiny_model_dir, tmp_path / "qlora", quantization={"bits": 4}, max_steps=8))
    assert qlora.terminal.type == "completed", qlora.terminal.payload
    assert (tmp_path / "qlora" / "adapter_model.safetensors").exists()

    # The other methods on the other weights: KTO fully fine-tuned, ORPO on a 4-bit base.
    kto = run_job(
        pref_config(tiny_model_dir, tmp_path / "kto-full", "kto", peft={"method": "full"}, max_steps=4)
    )
    assert kto.terminal.type == "completed", kto.terminal.payload
    moved = tensors(tmp_path / "kto-full" / "model.safetensors")
    assert any(not (base[k] == moved[k]).all() for k in base if k in moved)
    orpo = run_job(
        pref_config(tiny_model_dir, tmp_path / "orpo-4bit", "orpo", quantization={"bits": 4}, max_steps=4)
    )
    assert orpo.terminal.type == "completed", orpo.terminal.payload


# ---- cancel and resume -----------------------------------------------------------------------------


def test_a_cancelled_dpo_run_resumes_to_the_uninterrupted_adapter(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    whole = run_job(
        pref_config(
            tiny_model_dir, tmp_path / "whole", max_steps=10, checkpoint={"every_steps": 100, "keep": 1}
        )
    )
    assert whole.terminal.type == "completed", whole.terminal.payload

    cfg = pref_config(
        tiny_model_dir, tmp_path / "split", max_steps=10, checkpoint={"every_steps": 100, "keep": 1}
    )
    run = Run(cfg)
    try:
        run.wait_for("progress", lambda p: p.get("unit") is None and p["step"] >= 3)
        run.manager.cancel(run.job_id)
        done = run.wait()
    finally:
        run.close()
    assert done.type == "cancelled", done.payload
    assert done.payload["step"] < 10
    assert not (tmp_path / "split" / "README.md").exists()  # no card (TRL's) before the run completes
    again = run_job({**cfg, "resume": "auto"})
    assert again.terminal.type == "completed", again.terminal.payload
    assert again.terminal.payload["summary"]["resumed_from"] == done.payload["checkpoint"]
    a = tensors(tmp_path / "whole" / "adapter_model.safetensors")
    b = tensors(tmp_path / "split" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).abs().max() < 1e-5, name


# ---- GRPO -------------------------------------------------------------------------------------------


def grpo_config(
    model: Path, out: Path, data: Path, rewards: list[dict[str, Any]], **over: Any
) -> dict[str, Any]:
    cfg = tiny_config(
        model,
        out,
        preference={"method": "grpo", "num_generations": 4, "max_completion_length": 16, "rewards": rewards},
        training_parameters={"epochs": 3, "batch_size": 32, "learning_rate": 3e-3, "logging_steps": 10},
        max_steps=90,
        checkpoint={"every_steps": 1000, "keep": 1},
    )
    cfg["dataset"] = {"path": str(data), "validation_split": 0}
    cfg.update(over)
    return cfg


def test_grpo_rewards_are_what_the_config_says() -> None:
    from finetune_worker.config.preference import PreferenceSection
    from finetune_worker.context import JobContext
    from finetune_worker.training.rewards import reward_functions

    section = PreferenceSection.model_validate(
        {
            "method": "grpo",
            "rewards": [
                {"type": "exact_match"},
                {"type": "exact_match", "normalize": False, "weight": 0.5},
                {"type": "f1"},
                {"type": "regex", "pattern": r"\d+"},
                {"type": "regex", "pattern": r"\d+", "full": True},
                {"type": "length", "max_tokens": 4},
            ],
        }
    )
    funcs, weights = reward_functions(section.rewards, JobContext())
    assert [f.__name__ for f in funcs] == ["exact_match", "exact_match_2", "f1", "regex", "regex_2", "length"]
    assert weights == [1.0, 0.5, 1.0, 1.0, 1.0, 1.0]
    completions = [[{"role": "assistant", "content": c}] for c in ("The sky is Blue!", "42", "sky blue")]
    reference = ["the sky is blue", "42", None]
    ids = [[1] * 4, [1] * 6, [1] * 8]
    got = [
        f(prompts=[None] * 3, completions=completions, reference=reference, completion_ids=ids) for f in funcs
    ]
    assert got[0] == [1.0, 1.0, None]  # SQuAD normalization; no reference: no opinion
    assert got[1] == [0.0, 1.0, None]
    assert got[2][0] == 1.0 and got[2][2] is None
    assert got[3] == [0.0, 1.0, 0.0] and got[4] == [0.0, 1.0, 0.0]
    assert got[5] == [-0.0, -0.5, -1.0]


def test_grpo_configs_are_checked(tiny_model_dir: Path, tmp_path: Path) -> None:
    rows = tmp_path / "prompts.jsonl"
    rows.write_text(
        '{"prompt": "Hi?", "answer": "Hello."}\n{"question": "Bye?"}\n{"prompt": [], "answer": "x"}\n'
    )
    cfg = grpo_config(
        tiny_model_dir, tmp_path / "out", rows, [{"type": "exact_match"}, {"type": "regex", "pattern": "("}]
    )
    cfg["training_parameters"]["batch_size"] = 6
    with pytest.raises(ConfigError) as info:
        parse_job_config(cfg)
    text = str(info.value)
    assert "preference.rewards[1].regex.pattern" in text and "not a valid regular expression" in text
    cfg["preference"]["rewards"] = [{"type": "exact_match"}]
    with pytest.raises(ConfigError) as info:
        parse_job_config(cfg)
    text = str(info.value)
    assert "training_parameters.batch_size: grpo samples preference.num_generations (4)" in text
    assert "row 2: missing key 'answer' (the reference answer that preference.rewards compare with" in text
    rows.write_text('{"prompt": "Hi?", "answer": "Hello."}\n{"prompt": [], "answer": "x"}\n')
    with pytest.raises(ConfigError, match="row 2: key 'prompt' must be a string or a non-empty list"):
        parse_job_config(cfg)
    cfg["preference"]["rewards"] = []
    with pytest.raises(ConfigError, match="grpo needs at least one reward"):
        parse_job_config(cfg)
    dpo = pref_config(tiny_model_dir, tmp_path / "dpo")
    dpo["preference"]["rewards"] = [{"type": "length", "max_tokens": 3}]
    with pytest.raises(ConfigError, match=r"preference.rewards: applies to grpo only \(method is dpo\)"):
        parse_job_config(dpo)


@pytest.fixture(scope="module")
def answering_model(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model after a short supervised run on the demo's Q&A: it answers some questions
    right, so an exact-match reward has something to reinforce."""
    out = tmp_path_factory.mktemp("sft") / "model"
    cfg = tiny_config(
        tiny_model_dir,
        out,
        "qa.jsonl",
        peft={"method": "full"},
        data={"max_seq_length": 64},
        training_parameters={"epochs": 5, "batch_size": 16, "learning_rate": 1e-3, "logging_steps": 20},
        max_steps=80,
        checkpoint={"every_steps": 1000, "keep": 1},
        seed=1,
    )
    cfg["dataset"]["validation_split"] = 0
    assert run_job(cfg).terminal.type == "completed"
    return out


def colour_questions(path: Path) -> Path:
    rows = [json.loads(line) for line in (DATA / "qa.jsonl").read_text().splitlines()]
    colours = [r for r in rows if r["question"].startswith("What colour")]
    picked = list({r["question"]: r for r in colours}.values())[:10]
    path.write_text(
        "".join(json.dumps({"prompt": r["question"], "answer": r["answer"]}) + "\n" for r in picked * 30)
    )
    return path


def test_grpo_with_an_exact_match_reward_raises_the_mean_reward(
    answering_model: Path, tmp_path: Path
) -> None:
    data = colour_questions(tmp_path / "colours.jsonl")
    run = run_job(
        grpo_config(answering_model, tmp_path / "grpo", data, [{"type": "exact_match"}]), timeout=600
    )
    assert run.terminal.type == "completed", run.terminal.payload
    rewards = [m["metrics"]["reward"] for m in run.of("metrics")]
    assert len(rewards) == 9
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.1, rewards
    assert all("rewards/exact_match/mean" in m["metrics"] for m in run.of("metrics"))
    assert (tmp_path / "grpo" / "adapter_model.safetensors").exists()


# ---- rewards from the BEAM --------------------------------------------------------------------------


def test_a_beam_process_scores_grpo_completions(answering_model: Path, tmp_path: Path) -> None:
    """Through the real worker process: the harness plays the BEAM process that scores."""
    from finetune_worker.testing import RemoteError, WorkerHarness

    data = colour_questions(tmp_path / "colours.jsonl")
    cfg = grpo_config(
        answering_model,
        tmp_path / "beam",
        data,
        [{"type": "beam", "timeout_s": 30}, {"type": "exact_match", "weight": 0.5}],
        max_steps=3,
        training_parameters={"epochs": 1, "batch_size": 8, "learning_rate": 2e-3, "logging_steps": 1},
    )
    with WorkerHarness() as w:
        ok, job_id = w.call("submit", json.dumps(cfg), w.pid)
        assert ok == "ok"
        requests = []
        while True:
            event = w.next_event(job_id, timeout=300)
            if event.terminal:
                break
            if event.type != "reward_request":
                continue
            p = event.payload
            requests.append(p)
            assert event.to == w.pid
            assert len(p["prompts"]) == len(p["completions"]) == len(p["references"]) == 8
            assert p["prompts"][0].startswith("What colour") and p["references"][0].startswith("The ")
            if len(requests) == 1:  # the wrong count is refused, the request still waits
                with pytest.raises(RemoteError, match="asked for 8 values, got 2"):
                    w.call("rewards", job_id, p["request"], [1.0, 2.0])
                with pytest.raises(RemoteError, match="value 1 is 'x'"):
                    w.call("rewards", job_id, p["request"], ["x"] * 8)
                with pytest.raises(
                    RemoteError, match=r"value 2 is an integer of 1329 bits: each must be a number within"
                ):
                    w.call("rewards", job_id, p["request"], [1, 10**400, *[0] * 6])  # an Erlang bignum
                with pytest.raises(RemoteError, match=r"value 1 is 1e\+300"):
                    w.call("rewards", job_id, p["request"], [1e300] * 8)  # infinite in float32
            scores = [1.0 if c.startswith("The ") else 0.0 for c in p["completions"]]
            assert w.call("rewards", job_id, p["request"], scores) == "ok"
            assert w.call("rewards", job_id, p["request"], scores) == ("error", "not_found")  # once only
        assert event.type == "completed", event.payload
        assert [r["step"] for r in requests] == [1, 2, 3]
        beam = [e.payload["metrics"]["rewards/beam/mean"] for e in w.events(job_id) if e.type == "metrics"]
        assert len(beam) == 3
        assert w.call("ping") == "pong"


def test_an_unanswered_reward_request_fails_the_job_not_the_worker(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from finetune_worker.testing import WorkerHarness

    data = colour_questions(tmp_path / "colours.jsonl")
    cfg = grpo_config(
        tiny_model_dir,
        tmp_path / "silent",
        data,
        [{"type": "beam", "timeout_s": 1}],
        max_steps=3,
        training_parameters={"epochs": 1, "batch_size": 8, "learning_rate": 2e-3, "logging_steps": 1},
    )
    with WorkerHarness() as w:
        events = w.submit_and_wait(json.dumps(cfg), timeout=300)
        failed = events[-1]
        assert failed.type == "failed", failed.payload
        assert failed.payload["error"] == "reward_failed"
        assert (
            "no answer to the reward request for step 1 (8 completions) within 1 s"
            in failed.payload["message"]
        )
        assert "rewards(JobId, Request, Rewards)" in failed.payload["hint"]
        assert [e.type for e in events].count("reward_request") == 1
        assert w.call("ping") == "pong"
    # Submitted with no subscriber at all, it is refused at submit (and by the standalone CLI);
    # a job queued with none all the same fails at its first request, with the reason.
    with WorkerHarness() as w:
        ok, issues = w.call("submit", json.dumps(cfg), None)
        assert ok == "error" and issues[0]["path"] == "preference.rewards[0]"
        assert "a beam reward is computed by the BEAM process" in issues[0]["message"]
    config_file = tmp_path / "grpo.json"
    config_file.write_text(json.dumps(cfg))
    cli = run_cli("run", str(config_file), cwd=tmp_path)
    assert (
        cli.returncode == 2 and "preference.rewards[0]: a beam reward is computed by the BEAM" in cli.stderr
    )
    run = run_job({**cfg, "output_dir": str(tmp_path / "nobody")})
    assert run.terminal.type == "failed"
    assert "submitted without a subscriber" in run.terminal.payload["message"]


def test_a_cancel_while_a_reward_request_waits_stops_the_job_untrained(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from finetune_worker.testing import WorkerHarness

    data = colour_questions(tmp_path / "colours.jsonl")
    out = tmp_path / "cancelled"
    cfg = grpo_config(
        tiny_model_dir,
        out,
        data,
        [{"type": "beam", "timeout_s": 120}],
        max_steps=6,
        checkpoint={"every_steps": 1, "keep": 1},
        training_parameters={"epochs": 1, "batch_size": 8, "learning_rate": 2e-3, "logging_steps": 1},
    )
    with WorkerHarness() as w:
        _, job_id = w.call("submit", json.dumps(cfg), w.pid)
        first = w.wait_for(job_id, "reward_request", timeout=300)[-1]
        assert w.call("rewards", job_id, first.payload["request"], [0.5] * 8) == "ok"  # step 1 trains
        second = w.wait_for(job_id, "reward_request", timeout=300)[-1]
        assert second.payload["step"] == 2
        assert w.call("cancel", job_id) == "ok"  # while step 2 waits for its rewards
        events = w.wait_for(job_id, "terminal", timeout=60)
        assert events[-1].type == "cancelled", events[-1].payload
        assert events[-1].payload == {"step": 1, "checkpoint": str(out / "checkpoint-1")}
        assert "reward_request" not in [e.type for e in events]
        assert w.call("rewards", job_id, second.payload["request"], [0.5] * 8) == ("error", "not_found")
        assert w.call("ping") == "pong"


def test_grpo_reads_references_when_present_and_requires_them_for_match_rewards() -> None:
    row = {"prompt": "Capital of France?", "answer": "Paris."}
    optional = RowSpec("prompts", reference="answer")
    assert normalize(1, row, optional).reference == "Paris."  # type: ignore[union-attr]
    assert normalize(1, {"question": "Capital of France?"}, optional).reference is None  # type: ignore[union-attr]
    with pytest.raises(RowError, match="missing key 'answer'"):
        normalize(1, {"prompt": "q"}, RowSpec("prompts", reference="answer", reference_required=True))
    with pytest.raises(RowError, match="the prompt must end with the user's turn"):
        normalize(1, {"prompt": [{"role": "system", "content": "Be brief."}]}, optional)


def test_settings_of_another_method_and_what_trl_would_refuse_late(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    def issues(**over: Any) -> str:
        cfg = pref_config(tiny_model_dir, tmp_path / "o", **over)
        with pytest.raises(ConfigError) as info:
            parse_job_config(cfg)
        return str(info.value)

    assert "preference.loss_type: applies to dpo only (method is kto)" in issues(
        preference={"method": "kto", "loss_type": "ipo"}, dataset={"path": str(DATA / "kto.jsonl")}
    )
    assert "exo_pair needs a label_smoothing above 0" in issues(
        preference={"method": "dpo", "loss_type": "exo_pair"}
    )
    assert "kto estimates its KL term from the other rows of a batch" in issues(
        preference={"method": "kto"},
        dataset={"path": str(DATA / "kto.jsonl")},
        training_parameters={"batch_size": 1},
    )
    assert "pissa rewrites the base weights" in issues(peft={"method": "pissa"})
    assert "dpo needs a beta above 0" in issues(preference={"method": "dpo", "beta": 0})


def test_column_renames_onto_preference_names_leave_supervised_ones_as_they_were() -> None:
    from finetune_worker.config.data import DataConfig

    # TRL's prompt/completion columns as Q&A, written either way round: read as before.
    assert DataConfig(columns={"completion": "answer", "prompt": "question"}).column_renames() == {
        "completion": "answer",
        "prompt": "question",
    }
    assert DataConfig(columns={"question": "prompt"}).column_renames() == {"prompt": "question"}
    # Preference names are ours too, for the file's own column names.
    assert DataConfig(columns={"chosen": "better", "worse": "rejected"}).column_renames() == {
        "better": "chosen",
        "worse": "rejected",
    }
