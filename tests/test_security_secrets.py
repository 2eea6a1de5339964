"""Secrets given in a config or the environment never appear in events, logs, status or files.

A real tiny training run with tracking on, a hub token and tracking keys in the worker's
environment, and credentials in the config (an MLflow URI with user:password, a secret-named
MLflow tag); then every output is searched for the secret strings: each event, ``status``,
``jobs``, ``info``, config error replies, the worker's stderr, and every file the run wrote.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from finetune_worker.security import is_secret_name, redact
from finetune_worker.testing import WorkerHarness
from test_train_helpers import tiny_config

ENV_SECRETS = {
    "HF_TOKEN": "hf_EnvHubToken0123456789",
    "HUGGING_FACE_HUB_TOKEN": "hf_OldHubToken0123456789",
    "MLFLOW_TRACKING_TOKEN": "mlflowEnvToken0123456789",
    "MLFLOW_TRACKING_PASSWORD": "mlflowEnvPassword987654",
    "WANDB_API_KEY": "wandbEnvApiKey0123456789abcdef0123456789",
}
CONFIG_SECRETS = {
    "uri_password": "UriPassw0rdInConfig",
    "tag_value": "TagSecretValueInConfig",
    "unknown_key": "hf_UnknownKeyTokenValue",
    "query_token": "QueryTokenInTheUri0123",
}
ALL = [*ENV_SECRETS.values(), *CONFIG_SECRETS.values()]


def leaks(text: str | bytes, where: str) -> list[str]:
    data = text.encode() if isinstance(text, str) else text
    return [f"{where}: {s}" for s in ALL if s.encode() in data]


def test_secret_names() -> None:
    for name in (
        "HF_TOKEN",
        "hub_token",
        "WANDB_API_KEY",
        "api-key",
        "apikey",
        "db_password",
        "client_secret",
    ):
        assert is_secret_name(name), name
    for name in ("model_name", "max_new_tokens", "output_dir", "tokenizer_source", "tokens_per_second"):
        assert not is_secret_name(name), name
    assert redact({"a": {"HF_TOKEN": "x"}, "u": ["https://me:pw@host/x"]}) == {
        "a": {"HF_TOKEN": "<redacted>"},
        "u": ["https://<redacted>@host/x"],
    }


def test_secrets_never_leave_the_worker(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg: dict[str, Any] = tiny_config(tiny_model_dir, out, max_steps=4, checkpoint={"every_steps": 2})
    cfg["tracking"] = {
        # port 9 (discard) is closed: the probe fails fast and the warning names the server
        "mlflow": {
            "tracking_uri": f"http://alice:{CONFIG_SECRETS['uri_password']}@127.0.0.1:9/"
            f"?access_token={CONFIG_SECRETS['query_token']}&region=eu",
            "tags": {"api_token": CONFIG_SECRETS["tag_value"]},
        },
        "tensorboard": True,
        "wandb": {"mode": "offline"},
    }
    env = dict(os.environ, **ENV_SECRETS, FINETUNE_WORKER_LOG_LEVEL="DEBUG")
    found: list[str] = []
    with WorkerHarness(env=env) as w:
        bad = dict(cfg, hf_token=CONFIG_SECRETS["unknown_key"])
        for call in ("validate", "submit"):
            reply = w.call(call, json.dumps(bad), *([w.pid] if call == "submit" else []), timeout=60)
            assert str(reply[0]) == "error" and any(i["path"] == "hf_token" for i in reply[1])
            found += leaks(repr(reply), f"{call} reply")

        ok, job = w.call("submit", json.dumps(cfg), w.pid, timeout=60)
        assert str(ok) == "ok"
        events = w.wait_for(str(job), "terminal", timeout=300)
        assert events[-1].type == "completed", events[-1].payload
        assert any(e.type == "log" and "mlflow" in str(e.payload.get("message")) for e in events), (
            "the MLflow warning (the message most likely to echo the URI) was never sent"
        )
        for e in w.event_log:
            found += leaks(repr((e.type, e.payload)), f"event {e.type}")
        found += leaks(repr(w.call("status", job)), "status")
        found += leaks(repr(w.call("jobs")), "jobs")
        found += leaks(repr(w.call("info")), "info")
        w.close_stdin()
        w.wait(30)
        found += leaks(w.stderr_text(), "stderr")

    files = [p for p in out.rglob("*") if p.is_file()]
    assert (out / "summary.json").is_file() and len(files) > 5
    written = {p.relative_to(out).parts[0] for p in files}
    assert {"runs", "wandb"} <= written, f"tracking wrote nothing to search: {sorted(written)}"
    for path in files:
        found += leaks(path.read_bytes(), str(path.relative_to(out)))
    assert not found, "secrets leaked:\n" + "\n".join(found)

    summary = json.loads((out / "summary.json").read_text())
    echoed = summary["config"]["tracking"]["mlflow"]
    assert echoed["tracking_uri"] == "http://<redacted>@127.0.0.1:9/?access_token=<redacted>&region=eu"
    assert echoed["tags"] == {"api_token": "<redacted>"}
