"""docs/errors.md is generated from real runs and checked here: a stale doc fails this test.

The config-error and call-error tables between ``<!-- BEGIN name -->`` / ``<!-- END name -->``
markers are produced by running each case below (configs through ``parse_job_config`` in a
scratch directory, calls through a live worker) and must equal the doc byte for byte. The
failure-code and Elixir tables are hand-written, and checked against ``errors.ERROR_CODES`` and
the bridge's source. Regenerate after changing a message::

    .venv/bin/python tests/test_errors_doc.py
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "errors.md"


@dataclass(frozen=True)
class Case:
    name: str
    path: str  # the JSON path the issue must carry ("" = the whole config)
    fix: str
    config: Callable[[], Any]  # what is sent to validate/submit (built inside the scratch dir)
    env: tuple[tuple[str, str], ...] = ()


def train(**over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "model_name": "model",
        "training_parameters": {"epochs": 1, "batch_size": 4, "learning_rate": 2e-4},
        "dataset": {"path": "data/train.jsonl", "validation_split": 0.1},
        "output_dir": "runs/new",
    }
    for key, value in over.items():
        section, _, field = key.partition("__")
        if field:
            cfg.setdefault(section, {})[field] = value
        elif value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    return cfg


def _other_run() -> dict[str, Any]:
    out = Path("runs/old")
    out.mkdir(parents=True, exist_ok=True)
    (out / ".finetune-worker-run.json").write_text(json.dumps({"fingerprint": "another-config"}))
    return train(output_dir="runs/old")


def _earlier_run_resume_false() -> dict[str, Any]:
    _other_run()
    return train(output_dir="runs/old", resume=False)


def _read_only_dir() -> dict[str, Any]:
    return train(output_dir="data/train.jsonl/run")


def _half_checkpoint() -> dict[str, Any]:
    Path("runs/half/checkpoint-5").mkdir(parents=True, exist_ok=True)
    return train(resume="runs/half/checkpoint-5")


CONFIG_CASES = [
    Case(
        "invalid JSON",
        "",
        "fix the JSON syntax at the line and column named",
        lambda: '{"model_name": "model",',
    ),
    Case("not a JSON object", "", "send one JSON object per job", lambda: "[1, 2]"),
    Case("not UTF-8", "", "save the config as UTF-8", lambda: b'{"model_name": "\xff"}'),
    Case(
        "config file missing",
        "",
        "check the path of `{file, Path}` / the CLI argument",
        lambda: ("file", "missing.json"),
    ),
    Case(
        "unknown job kind",
        "job",
        'use "train", "merge_lora", "merge", "evaluate" or "generate"',
        lambda: train(job="pretrain"),
    ),
    Case(
        "kind cannot be inferred",
        "job",
        'add "job", or use the seed keys of a kind',
        lambda: {"output_dir": "x"},
    ),
    Case(
        "unknown key",
        "training_parameters.lr",
        "remove it or correct its spelling (`finetune-worker schema` lists every key)",
        lambda: train(training_parameters__lr=0.1),
    ),
    Case(
        "unknown key holding a secret",
        "hf_token",
        "remove it: this worker needs no hub token (its value is never echoed)",
        lambda: train(hf_token="hf_abcdefgh"),
    ),
    Case("required key missing", "model_name", "add the key", lambda: train(model_name=None)),
    Case(
        "wrong type",
        "training_parameters.batch_size",
        "give a value of the documented type",
        lambda: train(training_parameters__batch_size="eight"),
    ),
    Case(
        "negative learning rate",
        "training_parameters.learning_rate",
        "use a positive learning rate (2e-4 is a common LoRA value)",
        lambda: train(training_parameters__learning_rate=-0.001),
    ),
    Case(
        "validation_split >= 1",
        "dataset.validation_split",
        "use a fraction in [0, 1); 0 turns evaluation off",
        lambda: train(dataset__validation_split=1.0),
    ),
    Case(
        "bits not 4 or 8", "quantization.bits", "use 4 (QLoRA) or 8", lambda: train(quantization={"bits": 3})
    ),
    Case("LoRA rank 0", "peft.r", "use a positive rank (8 or 16 are common)", lambda: train(peft={"r": 0})),
    Case(
        "warmup given twice",
        "training_parameters.warmup_ratio",
        "keep one of warmup_steps / warmup_ratio",
        lambda: train(training_parameters__warmup_steps=10, training_parameters__warmup_ratio=0.1),
    ),
    Case(
        "model directory missing",
        "model_name",
        "point model_name at a local model directory (config.json + weights); there is no hub access",
        lambda: train(model_name="no-such-model"),
    ),
    Case(
        "dataset file missing",
        "dataset.path",
        "check the path (relative paths resolve against the worker's cwd)",
        lambda: train(dataset__path="data/missing.jsonl"),
    ),
    Case(
        "output_dir holds another run",
        "output_dir",
        'choose another output_dir, or set "overwrite": true to replace the old run',
        _other_run,
    ),
    Case(
        "output_dir holds a run, resume false",
        "output_dir",
        'set "resume": "auto" to continue it, "overwrite": true to replace it, or another output_dir',
        _earlier_run_resume_false,
    ),
    Case(
        "output_dir not writable",
        "output_dir",
        "choose a directory this user can create and write (a path under a file cannot be created)",
        _read_only_dir,
    ),
    Case(
        "resume path missing",
        "resume",
        'give a checkpoint-N directory, or "auto"',
        lambda: train(resume="runs/nowhere/checkpoint-5"),
    ),
    Case(
        "resume path incomplete",
        "resume",
        "pick a complete checkpoint (a killed save leaves none visible; older ones are intact)",
        _half_checkpoint,
    ),
    Case(
        "path outside allowed roots",
        "model_name",
        "move the file under an allowed root, or start the worker with another --allowed-root",
        lambda: train(model_name="../outside/model"),
        env=(("FINETUNE_WORKER_ALLOWED_ROOTS", "."),),
    ),
    Case(
        "merge: adapter missing",
        "adapter_path",
        "point adapter_path at a peft adapter directory (adapter_config.json)",
        lambda: {"base_model_path": "model", "adapter_path": "no-adapter", "output_path": "merged"},
    ),
    Case(
        "merge: YAML missing",
        "yaml_config_path",
        "check the path of the MergeKit YAML",
        lambda: {"yaml_config_path": "missing.yaml", "output_dir": "merged"},
    ),
    Case(
        "merge: YAML malformed",
        "yaml_config_path",
        "fix the YAML at the line named",
        lambda: (
            (Path("bad.yaml").write_text("models: [\n") and None)
            or {"yaml_config_path": "bad.yaml", "output_dir": "merged"}
        ),
    ),
    Case(
        "evaluate: model missing",
        "model_path",
        "point model_path at a local model or adapter directory",
        lambda: {"job": "evaluate", "model_path": "no-such-model", "dataset": {"path": "data/train.jsonl"}},
    ),
]


@contextmanager
def scratch_dir(model_dir: Path) -> Iterator[Path]:
    """A cwd with ``model`` (a tiny model), ``data/train.jsonl`` and an ``../outside`` sibling."""
    old = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="errors-doc-") as tmp:
        work = Path(tmp) / "work"
        (work / "data").mkdir(parents=True)
        (Path(tmp) / "outside" / "model").mkdir(parents=True)
        (work / "model").symlink_to(model_dir)
        (work / "data" / "train.jsonl").write_text('{"text": "hello"}\n')
        os.chdir(work)
        try:
            yield work
        finally:
            os.chdir(old)


def run_config_case(case: Case) -> list[Any]:
    from finetune_worker.config import parse_job_config
    from finetune_worker.errors import ConfigError

    saved = {k: os.environ.get(k) for k, _ in case.env}
    os.environ.update(dict(case.env))
    try:
        parse_job_config(case.config())
    except ConfigError as exc:
        return exc.issues
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    raise AssertionError(f"case {case.name!r} was accepted")


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def config_table(model_dir: Path) -> str:
    rows = ["| case | JSON path | message (as `validate` returns it) | fix |", "| --- | --- | --- | --- |"]
    with scratch_dir(model_dir) as work:
        for case in CONFIG_CASES:
            issues = run_config_case(case)
            match = [i for i in issues if i.path == case.path]
            assert match, f"{case.name}: no issue at {case.path!r}: {[str(i) for i in issues]}"
            text = str(match[0]).split(": ", 1)[1] if ": " in str(match[0]) else str(match[0])
            text = text.replace(str(work.parent), "<tmp>")
            rows.append(
                f"| {cell(case.name)} | `{case.path or '<config>'}` | {cell(text)} | {cell(case.fix)} |"
            )
    return "\n".join(rows)


CALL_CASES: list[tuple[str, str, list[Any], str, str]] = [
    ("module outside the API", "os", ["system", "ls"], "os:system", "call module finetune_worker"),
    (
        "private or unknown function",
        "finetune_worker",
        ["_parse", "{}"],
        "_parse",
        "call a function of the API table",
    ),
    ("dotted function name", "finetune_worker", ["os.system", "ls"], "os.system", "names are never resolved"),
    ("wrong arity", "finetune_worker", ["status"], "status/0", "pass the documented arguments"),
    ("JobId not a binary", "finetune_worker", ["status", 5], "status(5)", "send the job id as a binary"),
    ("ReplyTo not a pid", "finetune_worker", ["submit", "{}", "me"], "submit/2", "pass self() or nil"),
    (
        "Config of a wrong type",
        "finetune_worker",
        ["validate", 42],
        "validate(42)",
        "send JSON, a map or {file, Path}",
    ),
]


def call_table() -> str:
    from finetune_worker.testing import RemoteError, WorkerHarness
    from finetune_worker.wire import Atom

    rows = ["| case | sent | `Class` | message | fix |", "| --- | --- | --- | --- | --- |"]
    with WorkerHarness() as w:
        for name, module, (function, *args), sent, fix in CALL_CASES:
            try:
                w.call(function, *args, module=module, timeout=60)
            except RemoteError as err:
                rows.append(f"| {name} | `{cell(sent)}` | `{err.cls}` | {cell(err.message)} | {cell(fix)} |")
            else:
                raise AssertionError(f"{name}: accepted")
        call_id = w.next_id()
        reply = w.call_raw((Atom("C"), call_id, Atom("finetune_worker"), Atom("ping")), expect_id=call_id)
        assert reply is not None and reply.error is not None
        rows.append(
            f"| call tuple of the wrong size | `{{'C', Id, M, F}}` | `{reply.error.cls}` | "
            f"{cell(reply.error.message)} | send `{{'C', Id, Module, Function, Args}}` |"
        )
    return "\n".join(rows)


def generated_sections(model_dir: Path) -> dict[str, str]:
    return {"config-errors": config_table(model_dir), "call-errors": call_table()}


def section(text: str, name: str) -> str:
    match = re.search(rf"<!-- BEGIN {name} -->\n(.*?)<!-- END {name} -->", text, re.DOTALL)
    assert match, f"docs/errors.md lacks the {name} markers"
    return match.group(1).removesuffix("\n")


# ---- tests ----------------------------------------------------------------------------------


def test_generated_tables_match_the_doc(tiny_model_dir: Path) -> None:
    text = DOC.read_text(encoding="utf-8")
    for name, table in generated_sections(tiny_model_dir).items():
        assert section(text, name) == table, (
            f"docs/errors.md section {name} is stale; regenerate with `.venv/bin/python tests/test_errors_doc.py`"
        )


def test_every_failure_code_is_documented_with_cause_and_fix() -> None:
    from finetune_worker.errors import ERROR_CODES

    rows = re.findall(
        r"^\| `([a-z_]+)` \| ([^|]+) \| ([^|]+) \|$", section(DOC.read_text(), "failure-codes"), re.M
    )
    assert {code for code, _, _ in rows} == set(ERROR_CODES)
    assert all(cause.strip() and fix.strip() for _, cause, fix in rows)


def test_every_error_class_and_elixir_reason_is_documented() -> None:
    text = DOC.read_text(encoding="utf-8")
    for cls in ("CallError", "ProtocolError", "ConfigError", "InternalError"):
        assert f"finetune_worker.errors.{cls}" in text
    lib = "\n".join(p.read_text() for p in (REPO / "elixir_bridge" / "lib").rglob("*.ex"))
    reasons = set(re.findall(r"\{:error, \{?:([a-z_]+)", lib)) | set(
        re.findall(r"\{:stop, \{:([a-z_]+)", lib)
    )
    documented = set(
        re.findall(r"^\| `\{:(?:error|stop), \{?:([a-z_]+)", section(text, "elixir-errors"), re.M)
    )
    assert reasons <= documented, f"undocumented Elixir errors: {sorted(reasons - documented)}"
    assert documented <= reasons, f"documented but not in the bridge: {sorted(documented - reasons)}"


def regenerate() -> None:
    from finetune_worker.testing.tiny import build_tiny_model

    text = DOC.read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        build_tiny_model(model)
        for name, table in generated_sections(model).items():
            section(text, name)  # the markers must exist
            text = re.sub(
                rf"<!-- BEGIN {name} -->\n.*?<!-- END {name} -->",
                lambda _, name=name, table=table: f"<!-- BEGIN {name} -->\n{table}\n<!-- END {name} -->",
                text,
                flags=re.DOTALL,
            )
    DOC.write_text(text, encoding="utf-8")
    print(f"wrote {DOC}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "python"))
    regenerate()
