"""Experiment tracking through real training runs: MLflow (local store and a real server),
TensorBoard (event files read back), W&B offline, and failures that only warn."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from finetune_worker.config import parse_job_config
from finetune_worker.config.tracking import TrackingConfig
from finetune_worker.testing import WorkerHarness
from test_train_helpers import run_job, tiny_config


def _need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install '.[tracking]' to run this test)")


def tracked_config(model: Path, out: Path, tracking: dict[str, Any], **over: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {"max_steps": 6, "checkpoint": {"every_steps": 100, "keep": 1}, **over}
    return tiny_config(model, out, "qa.jsonl", tracking=tracking, **settings)


def test_promised_tracking_block_validates_as_written(tiny_model_dir: Path, tmp_path: Path) -> None:
    block = {
        "mlflow": {"tracking_uri": "http://127.0.0.1:5000"},
        "tensorboard": True,
        "wandb": {"mode": "offline"},
    }
    _, cfg = parse_job_config(tracked_config(tiny_model_dir, tmp_path / "o", block))
    assert cfg.tracking.mlflow.tracking_uri == "http://127.0.0.1:5000"
    assert cfg.tracking.tensorboard is not None and cfg.tracking.wandb.mode == "offline"
    assert cfg.tracking.enabled() == ["mlflow", "tensorboard", "wandb"]
    assert TrackingConfig.model_validate({"mlflow": True, "tensorboard": False}).enabled() == ["mlflow"]
    with pytest.raises(Exception, match="mode"):
        TrackingConfig.model_validate({"wandb": {"mode": "sometimes"}})


def test_mlflow_local_store_and_tensorboard(tiny_model_dir: Path, tmp_path: Path) -> None:
    _need("mlflow")
    _need("tensorboard")
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    run = run_job(tracked_config(tiny_model_dir, out, {"mlflow": {}, "tensorboard": True}), timeout=600)
    done = run.terminal
    assert done.type == "completed", done.payload
    assert not [w for w in run.of("log") if w["level"] == "warning" and "tracking" in w["message"]]
    info = done.payload["summary"]["tracking"]
    assert json.loads((out / "summary.json").read_text())["tracking"] == info
    name = info["mlflow"]["run_name"]
    assert name.startswith("run-") and info["tensorboard"]["run_name"] == name
    announced = [e for e in run.of("log") if e.get("run_name")]
    assert announced and announced[0]["run_name"] == name

    # MLflow: read the run back through its client
    client = MlflowClient(info["mlflow"]["tracking_uri"])
    assert info["mlflow"]["tracking_uri"] == f"sqlite:///{out / 'mlflow.db'}"
    mrun = client.get_run(info["mlflow"]["run_id"])
    assert mrun.info.status == "FINISHED" and mrun.info.run_name == name
    assert mrun.data.params["peft.method"] == "lora" and mrun.data.params["max_steps"] == "6"
    losses = client.get_metric_history(mrun.info.run_id, "train/loss")
    assert [m.step for m in losses] == list(range(1, 7))
    evals = client.get_metric_history(mrun.info.run_id, "eval/loss")
    summary = done.payload["summary"]
    assert [m.step for m in evals] == [0, 6]  # before and after training
    assert evals[-1].value == pytest.approx(summary["final_eval_loss"])
    assert "eval/perplexity" in mrun.data.metrics
    # The result as metrics, so runs sort and compare on it.
    assert mrun.data.metrics["final/perplexity"] == pytest.approx(summary["final_perplexity"])
    assert mrun.data.metrics["base/perplexity"] == pytest.approx(summary["base_perplexity"])
    assert mrun.data.metrics["final/train_loss"] == pytest.approx(summary["train_loss"])
    # The run's documents are uploaded; the weights stay in output_dir, which a tag names.
    top = {a.path for a in client.list_artifacts(mrun.info.run_id)}
    assert top == {"summary.json", "report.html", "metrics.jsonl", "README.md"}, top
    assert mrun.data.tags["finetune_worker.output_dir"] == str(out)
    assert (out / "mlartifacts").is_dir()  # artifacts stay beside the local store, not in the cwd
    assert not list((out / "mlartifacts").rglob("*.safetensors"))  # no second copy of the weights

    # TensorBoard: read the event file back
    log_dir = Path(info["tensorboard"]["log_dir"])
    assert log_dir == out / "runs" / name
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "train/learning_rate", "eval/loss", "eval/perplexity"} <= set(tags)
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 7))
    assert acc.Scalars("eval/loss")[-1].value == pytest.approx(summary["final_eval_loss"], rel=1e-5)


def test_sqlite_artifacts_go_beside_the_database_as_sqlalchemy_reads_it(tmp_path: Path) -> None:
    pytest.importorskip("sqlalchemy")
    from finetune_worker.training.tracking import _artifacts_beside

    beside = {
        f"sqlite:///{tmp_path}/a#b/m.db": (tmp_path / "a#b" / "mlartifacts").as_uri(),
        f"sqlite+pysqlite:///{tmp_path}/m.db": (tmp_path / "mlartifacts").as_uri(),
        "sqlite:///rel/m.db": (Path.cwd() / "rel" / "mlartifacts").as_uri(),
        "sqlite:///": None,
        "sqlite:///:memory:": None,
        "http://127.0.0.1:5000": None,
        "postgresql://user@host/db": None,
    }
    assert {uri: _artifacts_beside(uri) for uri in beside} == beside


def test_a_shared_mlflow_store_named_once_compares_runs(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLFLOW_TRACKING_URI in the worker's environment: every run with MLflow on lands in that one
    store, with its base and fine-tuned scores as metrics; weights are copied only when asked."""
    _need("mlflow")
    from mlflow import MlflowClient

    shared = tmp_path / "shared"
    shared.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{shared / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "team-sweep")
    monkeypatch.chdir(tmp_path)
    evaluation = {"max_rows": 4, "batch_size": 4, "generation": {"max_new_tokens": 6}, "samples": 1}
    summaries = {}
    for name, lr, mlflow in (("low-lr", 1e-4, True), ("high-lr", 5e-3, {"log_model": True})):
        out = tmp_path / name
        cfg = tracked_config(
            tiny_model_dir,
            out,
            {"mlflow": mlflow},
            evaluation=evaluation,
            training_parameters={"epochs": 1, "batch_size": 8, "learning_rate": lr, "logging_steps": 1},
        )
        run = run_job(cfg, timeout=600)
        assert run.terminal.type == "completed", run.terminal.payload
        summaries[name] = run.terminal.payload["summary"]
        info = summaries[name]["tracking"]["mlflow"]
        assert (
            info["tracking_uri"] == f"sqlite:///{shared / 'mlflow.db'}" and info["experiment"] == "team-sweep"
        )
        started = next(e["message"] for e in run.of("log") if e.get("run_name"))
        assert "(from MLFLOW_TRACKING_URI)" in started and "experiment 'team-sweep'" in started
        assert not (out / "mlflow.db").exists() and not (out / "mlartifacts").exists()

    client = MlflowClient(f"sqlite:///{shared / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("team-sweep")
    assert experiment is not None and experiment.artifact_location == (shared / "mlartifacts").as_uri()
    ranked = client.search_runs([experiment.experiment_id], order_by=["metrics.`final/perplexity` ASC"])
    assert len(ranked) == 2
    perplexities = sorted((s["final_perplexity"], name) for name, s in summaries.items())
    assert [r.data.tags["finetune_worker.output_dir"] for r in ranked] == [
        str(tmp_path / name) for _, name in perplexities
    ]
    for mrun in ranked:
        summary = summaries[Path(mrun.data.tags["finetune_worker.output_dir"]).name]
        scores = summary["evaluation"]["metrics"]
        metrics = mrun.data.metrics
        for stage in ("base", "fine_tuned"):
            for key in ("exact_match", "f1", "bleu", "rouge_l", "perplexity"):
                assert metrics[f"evaluation/{stage}/{key}"] == pytest.approx(scores[stage][key]), (stage, key)
        assert "evaluation/base/rows" not in metrics
        assert metrics["final/perplexity"] == pytest.approx(summary["final_perplexity"])
        # The evaluation section stood in for the Trainer's evaluations: still two eval/loss points.
        evals = client.get_metric_history(mrun.info.run_id, "eval/loss")
        assert [(m.step, m.value) for m in evals] == [
            (0, pytest.approx(summary["base_eval_loss"])),
            (summary["steps"], pytest.approx(summary["final_eval_loss"])),
        ]
        model_files = {Path(a.path).name for a in client.list_artifacts(mrun.info.run_id, "model")}
        if mrun.data.tags["finetune_worker.output_dir"].endswith("high-lr"):
            assert {"adapter_model.safetensors", "adapter_config.json"} <= model_files  # log_model
        else:
            assert model_files == set()
    assert not (tmp_path / "mlartifacts").exists()  # nothing in the cwd
    assert len(list((shared / "mlartifacts").rglob("adapter_model.safetensors"))) == 1


def test_unreachable_mlflow_and_missing_backend_only_warn(tiny_model_dir: Path, tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tracking: dict[str, Any] = {"mlflow": {"tracking_uri": f"http://127.0.0.1:{port}"}}
    if importlib.util.find_spec("wandb") is None:
        tracking["wandb"] = {"mode": "offline"}  # missing package: must only warn too
    run = run_job(tracked_config(tiny_model_dir, tmp_path / "run", tracking), timeout=600)
    assert run.terminal.type == "completed", run.terminal.payload
    warnings = [w["message"] for w in run.of("log") if w["level"] == "warning"]
    # without mlflow installed the same run only warns about the missing package
    why = "unreachable" if importlib.util.find_spec("mlflow") else "No module named"
    assert any("mlflow" in w and why in w and "training goes on" in w for w in warnings), warnings
    if "wandb" in tracking:
        assert any("wandb" in w and "No module named" in w for w in warnings), warnings
    assert run.terminal.payload["summary"]["steps"] == 6
    assert "tracking" not in run.terminal.payload["summary"]  # no backend started


def test_wandb_offline_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    _need("wandb")
    out = tmp_path / "run"
    run = run_job(tracked_config(tiny_model_dir, out, {"wandb": {"mode": "offline"}}), timeout=600)
    assert run.terminal.type == "completed", run.terminal.payload
    assert not [w for w in run.of("log") if w["level"] == "warning" and "wandb" in w["message"]], run.of(
        "log"
    )
    info = run.terminal.payload["summary"]["tracking"]["wandb"]
    assert info["mode"] == "offline" and info["error"] is None
    offline = list((out / "wandb").glob(f"offline-run-*-{info['run_id']}"))
    assert offline, list((out / "wandb").iterdir())
    assert list(offline[0].glob("*.wandb"))  # the run's record, ready for `wandb sync`


@contextlib.contextmanager
def mlflow_server(store: Path, *extra: str, env: dict[str, str] | None = None) -> Iterator[int]:
    """A real `mlflow server` on a free loopback port (yields the port); stopped afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store.mkdir(exist_ok=True)
    cmd = [
        sys.executable, "-m", "mlflow", "server", *extra, "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
        "--default-artifact-root", (store / "artifacts").as_uri(), "--workers", "1",
    ]  # fmt: skip
    server = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env or {**os.environ}, cwd=store
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert server.poll() is None, "mlflow server exited"
                assert time.monotonic() < deadline, "mlflow server did not start in 120 s"
                time.sleep(0.5)
        yield port
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.mark.slow
def test_mlflow_server_on_loopback(tiny_model_dir: Path, tmp_path: Path) -> None:
    _need("mlflow")
    from mlflow import MlflowClient

    with mlflow_server(tmp_path / "server") as port:
        uri = f"http://127.0.0.1:{port}"
        run = run_job(
            tracked_config(tiny_model_dir, tmp_path / "run", {"mlflow": {"tracking_uri": uri}}), timeout=600
        )
        assert run.terminal.type == "completed", run.terminal.payload
        info = run.terminal.payload["summary"]["tracking"]["mlflow"]
        assert info["error"] is None and info["tracking_uri"] == uri
        client = MlflowClient(uri)
        mrun = client.get_run(info["run_id"])
        assert mrun.info.status == "FINISHED"
        assert len(client.get_metric_history(mrun.info.run_id, "train/loss")) == 6
        assert "summary.json" in {a.path for a in client.list_artifacts(mrun.info.run_id)}


def test_cancelled_run_is_killed_and_resume_continues_the_same_mlflow_run(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    _need("mlflow")
    from mlflow import MlflowClient

    from test_train_helpers import Run

    out = tmp_path / "run"
    cfg = tracked_config(tiny_model_dir, out, {"mlflow": {}}, max_steps=12)
    first = Run(cfg)
    try:
        first.wait_for("progress", lambda p: p["step"] >= 2)
        first.manager.cancel(first.job_id)
        assert first.wait(300).type == "cancelled"
    finally:
        first.close()
    name = next(e["run_name"] for e in first.of("log") if e.get("run_name"))
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    (killed,) = client.search_runs([client.get_experiment_by_name("finetune-worker").experiment_id])
    assert killed.info.status == "KILLED" and killed.info.run_name == name

    second = run_job(cfg, timeout=600)  # resume: "auto" continues from the cancel checkpoint
    assert second.terminal.type == "completed", second.terminal.payload
    info = second.terminal.payload["summary"]["tracking"]["mlflow"]
    assert info["run_name"] == name and info["run_id"] == killed.info.run_id
    assert any("(resumed)" in e["message"] for e in second.of("log") if e.get("run_name"))
    run = client.get_run(info["run_id"])
    assert run.info.status == "FINISHED"
    steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "train/loss")})
    assert steps == list(range(1, 13))


@pytest.mark.slow
def test_mlflow_server_with_basic_auth_and_no_password_anywhere(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The documented form, user:password@host, reaches a real `mlflow server --app-name basic-auth`
    (the reachability probe sends the credentials as a header), and the password is in no output."""
    _need("mlflow")
    pytest.importorskip("flask_wtf", reason="mlflow's basic-auth app needs mlflow[auth] (Flask-WTF)")
    from mlflow import MlflowClient

    password = "Sup3rSecretMlflowPw"
    store = tmp_path / "server"
    store.mkdir()
    ini = store / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\ndefault_permission = EDIT\n"
        f"database_uri = sqlite:///{store / 'auth.db'}\n"
        f"admin_username = alice\nadmin_password = {password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    env = {
        **os.environ,
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only-key",
    }
    out = tmp_path / "run"
    with mlflow_server(store, "--app-name", "basic-auth", env=env) as port:
        uri = f"http://alice:{password}@127.0.0.1:{port}"
        cfg = tracked_config(tiny_model_dir, out, {"mlflow": {"tracking_uri": uri}, "tensorboard": True})
        with WorkerHarness() as w:
            events = w.submit_and_wait(json.dumps(cfg), timeout=600)
            w.close_stdin()
            w.wait(30)
            stderr = w.stderr_text()
        assert events[-1].type == "completed", events[-1].payload
        info = events[-1].payload["summary"]["tracking"]["mlflow"]
        assert info["error"] is None, info
        assert info["tracking_uri"] == f"http://<redacted>@127.0.0.1:{port}"
        client = MlflowClient(f"http://127.0.0.1:{port}")
        os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = "alice", password
        try:
            assert client.get_run(info["run_id"]).info.status == "FINISHED"
        finally:
            del os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]
        leaks = [f"event {e.type}" for e in events if password in repr(e.payload)]
        leaks += ["stderr"] if password in stderr else []
        leaks += [str(p) for p in out.rglob("*") if p.is_file() and password.encode() in p.read_bytes()]
        assert not leaks, leaks
