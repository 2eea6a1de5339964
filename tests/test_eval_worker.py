"""evaluate and generate through the real worker process, as the BEAM drives it (WorkerHarness)."""

from __future__ import annotations

import json
from pathlib import Path

from finetune_worker.testing import WorkerHarness
from test_train_helpers import DATA


def test_generate_then_evaluate_through_the_worker(tiny_model_dir: Path, tmp_path: Path) -> None:
    gen = {
        "job": "generate",
        "model_path": str(tiny_model_dir),
        "prompts": ["Once upon a time", [{"role": "user", "content": "What colour is the sky?"}]],
        "max_new_tokens": 12,
        "temperature": 0.8,
        "seed": 5,
        "output_dir": str(tmp_path / "gen"),
    }
    ev = {
        "job": "evaluate",
        "model_path": str(tiny_model_dir),
        "dataset": {"path": str(DATA / "heldout_qa.jsonl")},
        "max_rows": 4,
        "generation": {"max_new_tokens": 6},
        "output_dir": str(tmp_path / "eval"),
    }
    with WorkerHarness() as w:
        # A bad prompt is refused at submit, naming the prompt, before anything loads.
        refused = w.call("submit", json.dumps({**gen, "prompts": ["ok", []]}), w.pid)
        assert str(refused[0]) == "error"
        assert any(issue["path"] == "prompts[1]" for issue in refused[1]), refused

        events = w.submit_and_wait(json.dumps(gen), timeout=300)
        done = events[-1]
        assert done.type == "completed", done.payload
        completions = done.payload["summary"]["completions"]
        tokens = [e.payload for e in events if e.type == "token"]
        for c in completions:
            pieces = [t for t in tokens if t["prompt_index"] == c["prompt_index"]]
            assert "".join(t["text"] for t in pieces) == c["text"] and pieces
        # token payload keys cross the wire as atoms (known keys), texts as binaries
        term_payload = next(e for e in events if e.type == "token").term[3]
        assert {str(k) for k in term_payload} == {"index", "text", "prompt_index"}
        lines = (tmp_path / "gen" / "completions.jsonl").read_text().splitlines()
        assert [json.loads(line)["text"] for line in lines] == [c["text"] for c in completions]

        events = w.submit_and_wait(json.dumps(ev), timeout=300)
        done = events[-1]
        assert done.type == "completed", done.payload
        evals = [e.payload["metrics"] for e in events if e.type == "eval"]
        assert len(evals) == 1 and evals[0]["perplexity"] > 1 and evals[0]["answered_rows"] == 4
        metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
        assert metrics == done.payload["summary"]
        assert metrics["metrics"]["perplexity"] == evals[0]["perplexity"]
        assert len((tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()) == 4
        assert w.call("info")["queue_length"] == 0
        w.close_stdin()
        assert w.wait(timeout=30) == 0
