"""Every wire form of a config goes through one parser, so ``allowed_roots`` holds on each.

The forms (docs/protocol.md, "API"): a JSON binary (always the document itself), a map, and
``{file, Path}`` (binary or charlist). Driven through a real worker started with
``--allowed-root``, as a BEAM would: a binary naming a file outside the root must not be read
(its content, a password included, must not come back), ``{file, Path}`` must be confined
(symlinks followed), must be a regular file of bounded size, and a FIFO must be refused at once
instead of hanging the worker's main thread.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from finetune_worker.config import MAX_CONFIG_BYTES, parse_job_config
from finetune_worker.errors import ConfigError
from finetune_worker.security import ENV_ROOTS
from finetune_worker.testing import WorkerHarness
from finetune_worker.wire import Atom
from test_train_helpers import DATA, tiny_config

SECRET = "s3cr3t-pa55word-never-echoed"


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("forms")
    inside, outside = base / "inside", base / "outside"
    for d in (inside, outside):
        (d / "data").mkdir(parents=True)
        shutil.copy(DATA / "conversations.jsonl", d / "data" / "train.jsonl")
    shutil.copytree(tiny_model_dir, inside / "model")
    good = tiny_config(inside / "model", inside / "out")
    good["dataset"]["path"] = str(inside / "data" / "train.jsonl")
    good["tracking"] = {"mlflow": {"tracking_uri": f"http://alice:{SECRET}@127.0.0.1:1"}}
    (inside / "good.json").write_text(json.dumps(good))
    (outside / "job.json").write_text(json.dumps(good))
    (inside / "link.json").symlink_to(outside / "job.json")
    os.mkfifo(inside / "fifo.json")
    with open(inside / "huge.json", "wb") as f:
        f.truncate(MAX_CONFIG_BYTES + 1)
    return {"inside": inside, "outside": outside, "good": inside / "good.json"}


@pytest.fixture(scope="module")
def worker(tree: dict[str, Path]) -> Iterator[WorkerHarness]:
    env = {k: v for k, v in os.environ.items() if k != ENV_ROOTS}
    with WorkerHarness(["--allowed-root", str(tree["inside"])], env=env) as w:
        yield w
        assert w.alive, w.stderr_text()[-2000:]


def issues(reply: Any) -> list[dict[str, Any]]:
    assert isinstance(reply, tuple) and reply[0] == "error", reply
    return list(reply[1])


def messages(reply: Any) -> str:
    return " | ".join(i["message"] for i in issues(reply))


def test_the_good_config_passes_in_every_form(worker: WorkerHarness, tree: dict[str, Path]) -> None:
    good = tree["good"]
    text = good.read_text()
    assert worker.call("validate", text, timeout=60) == "ok"  # JSON binary
    assert worker.call("validate", json.loads(text)) == "ok"  # map
    assert worker.call("validate", (Atom("file"), str(good))) == "ok"  # {file, Binary}
    assert worker.call("validate", (Atom("file"), [ord(c) for c in str(good)])) == "ok"  # charlist
    assert worker.call("validate", "\ufeff" + text) == "ok"  # a byte-order mark is not a file name


@pytest.mark.parametrize("where", ["outside", "inside"])
def test_a_binary_is_the_document_never_a_file_name(
    worker: WorkerHarness, tree: dict[str, Path], where: str
) -> None:
    path = tree["outside"] / "job.json" if where == "outside" else tree["good"]
    reply = worker.call("validate", str(path))
    text = messages(reply)
    assert "must be the JSON or YAML document itself" in text and "{file, Path}" in text
    assert SECRET not in repr(reply) and "tracking_uri" not in repr(reply)


def test_file_form_is_confined_and_follows_symlinks(worker: WorkerHarness, tree: dict[str, Path]) -> None:
    for path in (
        tree["outside"] / "job.json",
        tree["inside"] / "link.json",
        tree["inside"] / ".." / "outside" / "job.json",
    ):
        reply = worker.call("validate", (Atom("file"), str(path)))
        assert "outside the allowed roots" in messages(reply), reply
        assert SECRET not in repr(reply)


def test_a_fifo_or_device_is_refused_at_once(worker: WorkerHarness, tree: dict[str, Path]) -> None:
    started = time.monotonic()
    reply = worker.call("validate", (Atom("file"), str(tree["inside"] / "fifo.json")), timeout=10)
    assert "not a regular file" in messages(reply)
    assert time.monotonic() - started < 5
    assert worker.call("ping") == "pong"


def test_an_oversized_file_is_refused_without_reading_it(
    worker: WorkerHarness, tree: dict[str, Path]
) -> None:
    reply = worker.call("validate", (Atom("file"), str(tree["inside"] / "huge.json")))
    assert "over the" in messages(reply) and "limit" in messages(reply)


def test_text_that_is_not_json_is_not_echoed(worker: WorkerHarness) -> None:
    for text in ("\ufeffpassword: " + SECRET, "x" * 5000 + SECRET, f'{{"password": "{SECRET}"'):
        reply = worker.call("validate", text)
        assert SECRET not in repr(reply), reply
    assert worker.call("validate", "[1, 2]")[0] == "error"


def test_in_process_a_str_is_never_read_as_a_path(
    tree: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV_ROOTS, raising=False)
    with pytest.raises(ConfigError, match="must be the JSON or YAML document itself"):
        parse_job_config(str(tree["outside"] / "job.json"))
    with pytest.raises(ConfigError, match="not a regular file"):
        parse_job_config(("file", "/dev/zero"))
    kind, _ = parse_job_config(("file", str(tree["good"])))
    assert kind == "train"
