"""The package's layers (docs/architecture.md), checked on its source.

Every ``finetune_worker`` import of every module is read with ``ast`` (imports inside functions
included), and must point down the layers; there is no import cycle; no module imports another's
private names; product code never imports the test support. A new job kind is one module: the
last test adds one from outside the package and runs it through a real worker.
"""

from __future__ import annotations

import ast
import json
import os
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from finetune_worker.testing import WorkerHarness

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "finetune_worker"

#: Layer of each part of the package, lowest first: a module may import its own part and any
#: lower layer. The features (training, merging, evaluation, export) share a layer with the server but
#: never import it, nor it them (the server runs them by name, through ``kinds``).
LAYERS: dict[str, int] = {
    "": 0, "errors": 0,  # the package itself holds only its version
    "wire": 1, "files": 1, "security": 1, "context": 1, "failures": 1, "kinds": 1, "extras": 1,
    "outputs": 2, "data": 2,
    "config": 3, "hf": 3,
    "server": 4, "training": 4, "merging": 4, "evaluation": 4, "export": 4,
    "testing": 5,
    "cli": 6,
    "__main__": 7,
}  # fmt: skip
FEATURES = {"training", "merging", "evaluation", "export"}


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = modules()


def _resolve(name: str) -> str | None:
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports(module: str) -> Iterator[tuple[str, list[str], int]]:
    """``(imported module, imported names, line)`` for every finetune_worker import in ``module``."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("finetune_worker") and (target := _resolve(alias.name)):
                    yield target, [], node.lineno
        elif (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and (node.module or "").startswith("finetune_worker")
        ):
            for alias in node.names:
                target = _resolve(f"{node.module}.{alias.name}") or _resolve(node.module or "")
                if target:
                    yield target, [alias.name] if target == _resolve(node.module or "") else [], node.lineno


def part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_part_has_a_layer() -> None:
    assert {part(m) for m in MODULES} <= set(LAYERS), sorted({part(m) for m in MODULES} - set(LAYERS))


def test_dependencies_point_down_the_layers() -> None:
    wrong = []
    for module in MODULES:
        mine = part(module)
        for target, _, line in imports(module):
            theirs = part(target)
            if theirs == mine:
                continue
            down = LAYERS[theirs] < LAYERS[mine]
            peers = LAYERS[theirs] == LAYERS[mine] and mine in FEATURES and theirs in FEATURES
            if not (down or peers):
                wrong.append(f"{module}:{line} imports {target} ({mine} -> {theirs})")
    assert wrong == [], "\n".join(wrong)


def test_no_import_cycles() -> None:
    graph = {m: {t for t, _, _ in imports(m) if t != m} for m in MODULES}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == [], "\n".join(cycles)


def test_no_module_imports_another_modules_private_names() -> None:
    private = [
        f"{module}:{line} imports {name} from {target}"
        for module in MODULES
        for target, names, line in imports(module)
        for name in names
        if name.startswith("_") and not name.endswith("__") and target != module
    ]
    assert private == [], "\n".join(private)


def test_the_checker_would_catch_a_wrong_import(tmp_path: Path) -> None:
    source = "from finetune_worker.cli import main\nfrom finetune_worker.server.jobs import _private\n"
    MODULES["finetune_worker.errors_probe"] = tmp_path / "probe.py"
    (tmp_path / "probe.py").write_text(source)
    try:
        found = list(imports("finetune_worker.errors_probe"))
    finally:
        del MODULES["finetune_worker.errors_probe"]
    assert ("finetune_worker.cli", ["main"], 1) in found and (
        "finetune_worker.server.jobs",
        ["_private"],
        2,
    ) in found


# ---- a new job kind is one module -------------------------------------------------------------

ECHO_KIND = '''
"""A job kind from outside the package: its schema, its KINDS and its run function, all here."""
from typing import Literal

from finetune_worker.config.base import StrictModel
from finetune_worker.context import JobContext
from finetune_worker.kinds import JobKind


class EchoConfig(StrictModel):
    job: Literal["echo"] = "echo"
    words: list[str]


def run(ctx: JobContext) -> dict:
    ctx.phase("generating")
    for i, word in enumerate(ctx.config.words, start=1):
        ctx.check_cancelled(step=i - 1)
        ctx.progress(i, len(ctx.config.words), unit="words", started=0.0)
    return {"outputs": {}, "summary": {"text": " ".join(ctx.config.words)}}


KINDS = (JobKind("echo", EchoConfig, run="echo_kind:run", recognise=lambda keys: "words" in keys, order=90),)
'''


def test_a_new_kind_needs_only_its_own_module(tmp_path: Path) -> None:
    (tmp_path / "echo_kind.py").write_text(textwrap.dedent(ECHO_KIND))
    env = dict(
        os.environ,
        FINETUNE_WORKER_KIND_MODULES="echo_kind",
        PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
    )
    with WorkerHarness(env=env) as w:
        events = w.submit_and_wait(json.dumps({"words": ["one", "new", "kind"]}), timeout=60)
        assert events[-1].type == "completed", events[-1].payload
        assert events[-1].payload["summary"]["text"] == "one new kind"
        assert [e.payload["done"] for e in events if e.type == "progress"] == [1, 2, 3]
        _, issues = w.call("validate", json.dumps({"job": "echo", "words": "not a list"}))
        assert [i["path"] for i in issues] == ["words"]


@pytest.mark.parametrize("name", ["train", "merge", "merge_lora", "evaluate", "generate"])
def test_every_kind_names_a_run_function_that_exists(name: str) -> None:
    from finetune_worker import kinds

    kind = kinds.get(name)
    assert kind is not None
    module, func = kind.run.split(":")
    source = MODULES[module].read_text(encoding="utf-8")
    assert any(isinstance(n, ast.FunctionDef) and n.name == func for n in ast.parse(source).body), kind.run
