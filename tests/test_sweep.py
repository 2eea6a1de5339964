"""Hyperparameter sweeps (the ``sweep`` kind): real training trials on the tiny model.

What is checked is the effect: each trial trains with its own sampled values (its adapter's
rank, the learning rate its optimizer ran at), the table matches the trials' own summaries,
pruning stops a worse trial early, a cancelled sweep resumes without training a finished trial
again, and a search space that cannot work is refused at validate naming its key.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from cli_helpers import render_events
from finetune_worker.config import parse_job_config
from finetune_worker.config.sweep import SWEEP_MARKER
from finetune_worker.errors import ConfigError
from finetune_worker.testing import WorkerHarness
from finetune_worker.wire import Atom
from test_train_helpers import run_job, tiny_config
from test_wire_maps import check_maps

REPO = Path(__file__).resolve().parents[1]
LR = "training_parameters.learning_rate"


def sweep_config(model: Path, out: Path, space: dict[str, Any], **over: Any) -> dict[str, Any]:
    """A sweep of short LoRA runs (6 steps, evaluated every 3) in ``out``."""
    train = tiny_config(
        model,
        out,
        max_steps=6,
        checkpoint={"every_steps": 3, "keep": 1},
        eval={"every_steps": 3},
    )
    return {"job": "sweep", "train": train, "search_space": space, "sampler": "random", "seed": 3, **over}


def issues(config: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ConfigError) as caught:
        parse_job_config(copy.deepcopy(config))
    return {i.path: i.message for i in caught.value.issues}


def first_lr(events: list[Any], trial: int) -> float:
    """The learning rate the optimizer ran at on the trial's first logged step."""
    return next(
        e.payload["metrics"]["learning_rate"]
        for e in events
        if e.type == "metrics" and e.payload["trial"] == trial
    )


def test_each_trial_trains_with_its_own_values_and_the_table_says_so(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "sweep"
    space = {
        LR: {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        "peft.r": {"type": "categorical", "choices": [2, 4, 8, 16]},
    }
    run = run_job(sweep_config(tiny_model_dir, out, space, trials=3))
    done = run.terminal
    assert done.type == "completed", done.payload
    summary, outputs = done.payload["summary"], done.payload["outputs"]
    table = summary["trials"]
    assert [t["trial"] for t in table] == [0, 1, 2]
    assert {t["state"] for t in table} == {"complete"}
    assert len({t["params"][LR] for t in table}) == 3  # sampled, not the train config's 5e-3
    for t in table:
        folder = out / f"trial-{t['trial']}"
        assert t["output_dir"] == str(folder)
        trained = json.loads((folder / "summary.json").read_text())
        # the trial's own run had the sampled values...
        assert trained["config"]["training_parameters"]["learning_rate"] == t["params"][LR]
        assert trained["config"]["peft"]["r"] == t["params"]["peft.r"]
        assert trained["final_eval_loss"] == pytest.approx(t["eval_loss"])
        assert t["steps"] == trained["steps"] == 6
        # ...and trained with them: the adapter has the sampled rank
        adapter = json.loads((folder / "adapter_config.json").read_text())
        assert adapter["r"] == t["params"]["peft.r"]
    # the optimizer ran at each trial's rate (a linear schedule: the same factor at step 1)
    ratios = [first_lr(run.events, t["trial"]) / t["params"][LR] for t in table]
    assert ratios == pytest.approx([ratios[0]] * 3, rel=1e-4)
    # every event of a trial says which one
    trained_events = [e for e in run.events if e.type in ("progress", "metrics", "eval", "checkpoint")]
    tagged = [e.payload.get("trial") for e in trained_events if e.payload.get("unit") != "trials"]
    assert set(tagged) == {0, 1, 2}
    assert [p["done"] for p in run.of("progress") if p.get("unit") == "trials"] == [1, 2, 3]
    # the first trial tokenized the data, the others reused it; the shared cache went at the end
    reused = [p.get("trial") for p in run.of("log") if "reused from the data cache" in p["message"]]
    assert reused == [1, 2]
    assert not (out / ".data-cache").exists()
    # the best trial is the one with the lowest held-out loss, and its adapter is the output
    best = min(table, key=lambda t: t["eval_loss"])
    assert summary["best_trial"] == best["trial"]
    assert summary["best_params"] == best["params"]
    assert summary["best_eval_loss"] == pytest.approx(best["eval_loss"])
    assert outputs["adapter_path"] == best["output_dir"]
    stored = json.loads(Path(outputs["trials_path"]).read_text())
    assert stored["trials"] == table and stored["best_trial"] == best["trial"]
    csv_rows = (out / "trials.csv").read_text().splitlines()
    assert csv_rows[0].startswith("trial,state,peft.r,training_parameters.learning_rate,eval_loss")
    assert len(csv_rows) == 4
    # `finetune-worker run` shows the table, and its next steps are the best trial's
    shown = render_events([(e.type, e.payload) for e in run.events])
    rows = [line.split("│")[1:-1] for line in shown.splitlines() if "│ complete " in line]
    assert [(int(r[0]), int(r[3])) for r in rows] == [(t["trial"], t["params"]["peft.r"]) for t in table]
    assert f"finetune-worker chat {best['output_dir']}" in shown


def test_pruning_stops_a_worse_trial_early(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    cfg = sweep_config(
        tiny_model_dir,
        out,
        {LR: {"type": "categorical", "choices": [1e-2, 1e-7]}},
        trials=2,
        # a rate that learns first, then one that barely moves the weights
        first_trials=[{LR: 1e-2}, {LR: 1e-7}],
        pruning={"startup_trials": 1, "warmup_evaluations": 1},
    )
    cfg["train"]["max_steps"] = 12
    cfg["train"]["eval"] = {"every_steps": 2}
    run = run_job(cfg)
    assert run.terminal.type == "completed", run.terminal.payload
    good, bad = run.terminal.payload["summary"]["trials"]
    assert (good["state"], good["steps"]) == ("complete", 12)
    assert bad["state"] == "pruned"
    # prunable from its second evaluation (step 4); it stops at the next step boundary
    assert bad["steps"] == 5
    evals = {
        (e.payload["trial"], e.payload["step"]): e.payload["metrics"]["eval_loss"]
        for e in run.events
        if e.type == "eval" and "model" not in e.payload
    }
    assert max(step for trial, step in evals if trial == 1) == 4
    assert evals[(1, 4)] > evals[(0, 4)]  # why it was pruned: behind the finished trial there
    assert bad["eval_loss"] == pytest.approx(evals[(1, 4)])
    folder = out / "trial-1"
    assert not (folder / "adapter_model.safetensors").exists()  # never finished
    assert not list(folder.glob("checkpoint-*"))  # a pruned trial is not resumed: no checkpoints kept
    assert (folder / "metrics.jsonl").is_file()
    assert run.terminal.payload["summary"]["best_trial"] == 0


def test_a_cancelled_sweep_resumes_without_training_finished_trials_again(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "resumed"
    cfg = sweep_config(
        tiny_model_dir, out, {LR: {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}, trials=3
    )
    cfg["train"]["max_steps"] = 8
    cfg["train"]["checkpoint"] = {"every_steps": 2, "keep": 2}
    cfg["train"]["eval"] = {"every_steps": 4}
    with WorkerHarness() as w:
        job = str(w.call("submit", json.dumps(cfg), w.pid)[1])
        first: list[Any] = []
        while not first or not (
            first[-1].type == "progress"
            and first[-1].payload.get("trial") == 1
            and first[-1].payload["step"] >= 3
        ):
            first.append(w.next_event(job, timeout=300))
        assert w.call("cancel", job) == "ok"
        first += w.wait_for(job, "terminal", timeout=120)
        cancelled = first[-1]
        assert cancelled.type == "cancelled", cancelled.payload
        stopped = cancelled.payload["step"]
        assert 3 <= stopped < 8 and cancelled.payload["checkpoint"] == str(
            out / "trial-1" / f"checkpoint-{stopped}"
        )
        table = json.loads((out / "trials.json").read_text())["trials"]
        assert [(t["trial"], t["state"]) for t in table] == [(0, "complete"), (1, "interrupted")]
        lr_1 = table[1]["params"][LR]
        trial_0 = (out / "trial-0" / "summary.json").stat().st_mtime_ns

        job = str(w.call("submit", json.dumps(cfg), w.pid)[1])  # the same config: resume "auto"
        second = w.wait_for(job, "terminal", timeout=300)
        assert second[-1].type == "completed", second[-1].payload
    # every map on the wire is a record or a table (a trial's params are a table)
    assert [p for e in first + second for p in check_maps(e.term[3], f"{e.type} event")] == []
    assert list(second[-1].term[3][Atom("summary")][Atom("best_params")]) == [LR]
    summary = second[-1].payload["summary"]
    assert [(t["trial"], t["state"]) for t in summary["trials"]] == [
        (0, "complete"),
        (1, "complete"),
        (2, "complete"),
    ]
    assert summary["trials"][1]["params"][LR] == lr_1  # the interrupted trial, again with its values
    tags = [
        e.payload.get("trial") for e in second if e.type == "progress" and e.payload.get("unit") != "trials"
    ]
    assert 0 not in tags  # trial 0 did not train again...
    assert (out / "trial-0" / "summary.json").stat().st_mtime_ns == trial_0
    # ...and trial 1 went on from the checkpoint the cancel wrote
    assert (
        next(e.payload["step"] for e in second if e.type == "progress" and e.payload.get("trial") == 1)
        == stopped + 1
    )
    resumed = json.loads((out / "trial-1" / "summary.json").read_text())
    assert resumed["resumed_from"] == cancelled.payload["checkpoint"]
    assert resumed["config"]["training_parameters"]["learning_rate"] == lr_1
    assert [
        p.payload["done"] for p in second if p.type == "progress" and p.payload.get("unit") == "trials"
    ] == [2, 3]


def test_a_search_space_that_cannot_work_is_refused_naming_its_key(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    base = sweep_config(tiny_model_dir, tmp_path / "s", {LR: {"type": "float", "low": 1e-4, "high": 1e-2}})
    parse_job_config(copy.deepcopy(base))  # the base is valid

    def with_space(**space: Any) -> dict[str, Any]:
        return {**base, "search_space": {**base["search_space"], **space}}

    got = issues(with_space(**{"peft.rank": {"type": "int", "low": 2, "high": 8}}))
    assert "did you mean peft.r?" in got["search_space.peft.rank"]
    got = issues(with_space(**{"peft.dropout": {"type": "float", "low": 0.0, "high": 1.0}}))
    assert "train.peft.dropout: Input should be less than 1" in got["search_space.peft.dropout.high"]
    got = issues(with_space(**{"peft.r": {"type": "float", "low": 2, "high": 8}}))
    assert got["search_space.peft.r"] == "peft.r is a whole number: use type int"
    got = issues(with_space(**{"model_name": {"type": "categorical", "choices": ["elsewhere"]}}))
    assert "paths cannot be searched" in got["search_space.model_name"]
    got = issues(with_space(**{"dataset.validation_split": {"type": "float", "low": 0.1, "high": 0.2}}))
    assert "held-out rows" in got["search_space.dataset.validation_split"]
    lr_choices = {"type": "categorical", "choices": ["cosine", "cosine_with_min_lr", "sine"]}
    got = issues(with_space(**{"training_parameters.lr_scheduler": lr_choices}))
    assert set(got) == {"search_space.training_parameters.lr_scheduler.choices[2]"}
    # pruning needs evaluations during training, and any sweep needs held-out rows
    no_steps = copy.deepcopy(base) | {"pruning": {"enabled": True}}
    no_steps["train"]["eval"] = {}
    assert "set eval.every_steps" in issues(no_steps)["train.eval.every_steps"]
    no_held_out = copy.deepcopy(base)
    no_held_out["train"]["dataset"]["validation_split"] = 0
    assert "held-out loss" in issues(no_held_out)["train.dataset.validation_split"]
    # the train config's own problems carry its prefix
    typo = copy.deepcopy(base)
    typo["train"]["training_parameters"]["learnig_rate"] = 1e-3
    assert "did you mean" in issues(typo)["train.training_parameters.learnig_rate"]


def test_a_folder_holding_another_sweep_or_none_to_resume_is_refused(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "taken"
    cfg = sweep_config(tiny_model_dir, out, {LR: {"type": "float", "low": 1e-4, "high": 1e-2}})
    assert "no sweep to resume" in issues(cfg | {"resume": True})["train.output_dir"]
    out.mkdir()
    (out / SWEEP_MARKER).write_text(json.dumps({"fingerprint": "another sweep"}))
    assert "a different train config or search space" in issues(cfg)["train.output_dir"]
    parse_job_config(cfg | {"overwrite": True})


def test_a_missing_optuna_names_the_sweep_extra(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "optuna", None)
    cfg = sweep_config(tiny_model_dir, tmp_path / "s", {LR: {"type": "float", "low": 1e-4, "high": 1e-2}})
    got = issues(cfg)["job"]
    assert got.startswith("Hyperparameter sweeps need the optuna package") and "finetune-worker[sweep]" in got


def test_the_shipped_example_validates(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the layout `make run` sees: .tiny/model next to configs/
    (tmp_path / ".tiny").mkdir()
    (tmp_path / ".tiny" / "model").symlink_to(tiny_model_dir)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    monkeypatch.chdir(tmp_path)
    kind, cfg = parse_job_config(("file", "configs/sweep-tiny.json"))
    assert kind == "sweep"
    assert cfg.trial_count == 4 and cfg.folder == tmp_path / "runs" / "sweep-tiny"


def test_a_journal_torn_by_a_kill_loses_only_its_last_line(tmp_path: Path) -> None:
    import optuna

    from finetune_worker.training.sweep import JOURNAL, open_journal

    study = optuna.create_study(study_name="sweep", storage=open_journal(tmp_path))
    study.tell(study.ask({"x": optuna.distributions.FloatDistribution(0, 1)}), 0.5)
    with (tmp_path / JOURNAL).open("ab") as f:
        f.write(b'{"op_code": 4, "study_id"')  # an append the kill cut short
    (tmp_path / f"{JOURNAL}.lock").symlink_to(tmp_path / JOURNAL)  # the dead writer's lock
    again = optuna.load_study(study_name="sweep", storage=open_journal(tmp_path))
    assert [t.value for t in again.trials] == [0.5]
    again.tell(again.ask(), 0.25)  # and it takes new trials (no 30 s wait on a stale lock)
    reread = optuna.load_study(study_name="sweep", storage=open_journal(tmp_path))
    assert [t.value for t in reread.trials] == [0.5, 0.25]
