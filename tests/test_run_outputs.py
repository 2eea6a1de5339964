"""What a finished training run leaves in its folder, and what the terminal says at its end:
a filled model card, shareable file modes, and next-step configs that really run."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from finetune_worker.config import parse_job_config

REPO = Path(__file__).resolve().parents[1]


def _fw(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-m", "finetune_worker", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


def test_a_run_leaves_a_model_card_shareable_files_and_next_steps(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    config = json.loads((REPO / "configs" / "tiny-lora.json").read_text())
    config.pop("evaluation", None)
    config.update(model_name=str(tiny_model_dir), output_dir=str(tmp_path / "run"), max_steps=4)
    config["dataset"]["path"] = str(REPO / config["dataset"]["path"])
    config["checkpoint"] = {"every_steps": 2, "keep": 2}
    path = tmp_path / "job.json"
    path.write_text(json.dumps(config))
    old = os.umask(0o022)
    try:
        done = _fw("run", str(path), cwd=tmp_path)  # the live display, piped
    finally:
        os.umask(old)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "run"

    # The terminal ends with what to do next, as commands that name this run's files.
    tail = done.stdout[done.stdout.index("next steps") :]
    assert f"AutoPeftModelForCausalLM.from_pretrained('{out}')" in tail
    for name in ("generate", "evaluate", "merge"):
        assert f"finetune-worker run {out / 'next' / (name + '.json')}" in tail
    assert f"the model card: {out / 'README.md'}" in tail

    # Every file is readable by the group and others, the safetensors (written 0600) included.
    private = [
        str(p.relative_to(out))
        for p in out.rglob("*")
        if p.is_file() and stat.S_IMODE(p.stat().st_mode) != 0o644 and not p.name.startswith(".")
    ]
    assert private == [] and (out / "adapter_model.safetensors").is_file()
    assert stat.S_IMODE((out / "checkpoint-4" / "adapter_model.safetensors").stat().st_mode) == 0o644

    # The model card is this run's, not peft's blank template.
    card = (out / "README.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert "More Information Needed" not in card
    assert card.startswith("---\nbase_model: ") and f'"{tiny_model_dir}"' in card.split("---")[1]
    assert "lora (r=8, alpha=16.0)" in card and "| learning rate | 0.003 |" in card
    assert f"| eval loss | {summary['base_eval_loss']:.4g} | {summary['final_eval_loss']:.4g} |" in card
    assert "| `conversations.jsonl` | 270 |" in card

    # The next-step configs are valid jobs of their kind, and generating with the run works.
    kinds = {
        name: parse_job_config(("file", str(out / "next" / f"{name}.json")))[0]
        for name in ("generate", "evaluate", "merge")
    }
    assert kinds == {"generate": "generate", "evaluate": "evaluate", "merge": "merge_lora"}
    generated = _fw("run", str(out / "next" / "generate.json"), "--json", cwd=tmp_path)
    assert generated.returncode == 0, generated.stderr[-3000:]
    last = json.loads(generated.stdout.splitlines()[-1])
    assert last["type"] == "completed"
