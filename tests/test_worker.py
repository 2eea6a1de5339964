"""The worker process through the harness: API calls, refusals, bad shapes, config forms."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from finetune_worker.testing import RemoteError, WorkerHarness, make_pid
from finetune_worker.wire import Atom, encode

CALL_ERROR = "finetune_worker.errors.CallError"
PROTOCOL_ERROR = "finetune_worker.errors.ProtocolError"


@pytest.fixture(scope="module")
def marker_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A module that creates a marker file when imported: proof that a refused call ran nothing."""
    d = tmp_path_factory.mktemp("evil")
    (d / "evilmod.py").write_text(
        f"open({str(d / 'imported')!r}, 'w').close()\ndef run(*a):\n    open({str(d / 'ran')!r}, 'w').close()\n"
    )
    return d


@pytest.fixture(scope="module")
def worker(marker_dir: Path):
    import os

    env = dict(os.environ, PYTHONPATH=str(marker_dir))
    with WorkerHarness(test_jobs=True, env=env) as w:
        yield w
        assert w.alive, w.stderr_text()
        assert w.stray == []


def test_info_and_ping(worker: WorkerHarness) -> None:
    assert worker.call("ping") == "pong"
    info = worker.call("info")
    assert info["version"] and info["python"] == ".".join(map(str, sys.version_info[:3]))
    assert info["protocol"] == 2
    assert info["devices"][-1]["type"] == "cpu"
    assert info["queue_length"] == 0
    assert info["pid"] == worker.proc.pid


def test_reply_maps_have_atom_keys(worker: WorkerHarness) -> None:
    # a BEAM decoding with [safe] must find only atoms it declared: record keys are atoms
    call_id = worker.next_id()
    reply = worker.call_raw(
        (Atom("C"), call_id, Atom("finetune_worker"), Atom("info"), []), expect_id=call_id
    )
    assert reply is not None and reply.ok
    info = reply.term[2]
    assert all(isinstance(k, Atom) for k in info)
    assert isinstance(info["devices"][0][Atom("type")], str)
    assert worker.call("status", "no-such-job") == ("error", "not_found")


def test_submit_runs_and_reports(worker: WorkerHarness, tmp_path: Path) -> None:
    config = {"job": "test_steps", "steps": 3, "step_seconds": 0.01, "output_dir": str(tmp_path / "out")}
    events = worker.submit_and_wait(json.dumps(config), timeout=30)
    types = [e.type for e in events]
    assert types[:3] == ["queued", "started", "phase"]
    assert types.count("progress") == 3 and types[-1] == "completed"
    assert [e.payload["step"] for e in events if e.type == "progress"] == [1, 2, 3]
    done = events[-1]
    assert done.to == worker.pid
    assert Path(done.payload["outputs"]["path"]).is_file()
    status = worker.call("status", done.job_id)
    assert status["state"] == "completed" and status["step"] == 3 and status["total_steps"] == 3
    assert status["phase"] == "training"
    assert any(j["job_id"] == done.job_id for j in worker.call("jobs"))


def test_config_as_map_with_atom_keys_and_as_file(worker: WorkerHarness, tmp_path: Path) -> None:
    as_map = {Atom("job"): "test_steps", Atom("steps"): 1, Atom("step_seconds"): 0}
    assert worker.call("validate", as_map) == "ok"
    path = tmp_path / "job.json"
    path.write_text(json.dumps({"job": "test_steps", "steps": 1, "step_seconds": 0}))
    assert worker.call("validate", (Atom("file"), str(path))) == "ok"
    events = worker.submit_and_wait((Atom("file"), str(path)), timeout=30)
    assert events[-1].type == "completed"


def test_invalid_configs_list_every_issue_with_its_path(worker: WorkerHarness, tmp_path: Path) -> None:
    bad = {"job": "test_steps", "steps": -1, "step_seconds": "slow", "bogus": 1}
    for call in ("validate", "submit"):
        args = [json.dumps(bad)] + ([worker.pid] if call == "submit" else [])
        result = worker.call(call, *args)
        assert result[0] == "error"
        assert {i["path"] for i in result[1]} == {"steps", "step_seconds", "bogus"}
        assert all(i["message"] for i in result[1])
    assert worker.call("validate", "{not json")[0] == "error"
    missing = worker.call("validate", (Atom("file"), str(tmp_path / "nope.json")))
    assert missing[0] == "error" and "cannot read config file" in missing[1][0]["message"]
    unknown = worker.call("validate", {"job": "rm_rf"})
    assert unknown[0] == "error" and unknown[1][0]["path"] == "job"


def test_test_kind_is_unreachable_without_the_env_flag() -> None:
    with WorkerHarness(test_jobs=False) as w:
        result = w.call("validate", '{"job": "test_steps"}')
        assert result[0] == "error" and result[1][0]["path"] == "job"


@pytest.mark.parametrize(
    ("module", "function", "args"),
    [
        ("os", "system", ["python -c 'import evilmod'"]),
        ("builtins", "eval", ["__import__('evilmod').run()"]),
        ("builtins", "exec", ["import evilmod"]),
        ("subprocess", "run", [["python", "-c", "import evilmod"]]),
        ("importlib", "import_module", ["evilmod"]),
        ("evilmod", "run", []),
        ("finetune_worker", "os.system", ["python -c 'import evilmod'"]),
        ("finetune_worker", "_parse", ["{}"]),
        ("finetune_worker", "__import__", ["evilmod"]),
        ("finetune_worker", "Runtime", []),
        ("finetune_worker", "config_form", [{}]),
        ("finetune_worker.server.api", "info", []),
        ("finetune_worker.server.worker", "serve", []),
    ],
)
def test_calls_outside_the_api_are_refused(
    worker: WorkerHarness, marker_dir: Path, module: str, function: str, args: list
) -> None:
    with pytest.raises(RemoteError) as err:
        worker.call(function, *args, module=module)
    assert err.value.cls == CALL_ERROR
    assert worker.call("ping") == "pong"
    assert not (marker_dir / "imported").exists()
    assert not (marker_dir / "ran").exists()


def test_module_and_function_must_be_atoms(worker: WorkerHarness) -> None:
    for module, function in [("finetune_worker", Atom("info")), (Atom("finetune_worker"), "info")]:
        call_id = worker.next_id()
        reply = worker.call_raw((Atom("C"), call_id, module, function, []), expect_id=call_id)
        assert reply is not None and not reply.ok and reply.error is not None
        assert reply.error.cls == CALL_ERROR


@pytest.mark.parametrize(
    ("function", "args", "needle"),
    [
        ("status", [], "takes 1 argument"),
        ("ping", [1], "takes 0 argument"),
        ("submit", [], "takes 1 to 2"),
        ("status", [5], "JobId must be a binary"),
        ("cancel", [[1, 2]], "JobId must be a binary"),
        ("submit", ['{"job": "test_steps"}', "not a pid"], "ReplyTo must be a pid"),
        ("validate", [42], "Config must be"),
        ("validate", [(Atom("file"), 42)], "Path must be"),
    ],
)
def test_wrong_arity_and_argument_types(
    worker: WorkerHarness, function: str, args: list, needle: str
) -> None:
    with pytest.raises(RemoteError) as err:
        worker.call(function, *args)
    assert err.value.cls == CALL_ERROR
    assert needle in err.value.message


def test_bad_shapes_with_an_id_get_an_error_reply(worker: WorkerHarness) -> None:
    cases = [
        lambda i: (Atom("C"), i, Atom("finetune_worker"), Atom("info")),  # 4-tuple
        lambda i: (Atom("C"), i, Atom("finetune_worker"), Atom("info"), [], 1),  # 6-tuple
        lambda i: (Atom("C"), i, Atom("finetune_worker"), Atom("info"), 5),  # Args not a list
        lambda i: (Atom("C"), i, Atom("finetune_worker"), Atom("info"), Atom("nil_ish")),
    ]
    for make in cases:
        call_id = worker.next_id()
        reply = worker.call_raw(make(call_id), expect_id=call_id)
        assert reply is not None and not reply.ok and reply.error is not None
        assert reply.error.cls in (CALL_ERROR, PROTOCOL_ERROR)
        assert isinstance(reply.error.trace, str)


def test_shapes_without_an_id_are_logged_and_the_worker_goes_on(worker: WorkerHarness) -> None:
    before = len(worker.stderr_text())
    worker.send_term(12345)  # not a tuple
    worker.send_term((Atom("X"), 1, 2))  # unknown tag
    worker.send_term((Atom("C"),))  # a call without an id
    worker.send_term((Atom("M"), (Atom("launch"), 1)))  # unknown cast
    worker.send_term((Atom("M"), (Atom("cancel"), 99)))  # cast with a bad job id
    worker.send_frame(b"\x83\x68\x05")  # a truncated tuple
    worker.send_frame(b"not etf at all")
    worker.send_frame(b"")
    assert worker.call("ping") == "pong"
    log = worker.stderr_text()[before:]
    assert "unknown cast" in log and "unknown message" in log and "not a valid term" in log
    assert "stream offset" in log


def test_reply_goes_back_with_any_id_term(worker: WorkerHarness) -> None:
    for call_id in [(1, 2), "a binary id", make_pid(), 2**70, Atom("an_atom")]:
        reply = worker.call_raw(
            (Atom("C"), call_id, Atom("finetune_worker"), Atom("ping"), []), expect_id=call_id
        )
        assert reply is not None and reply.ok and reply.value == "pong"


def test_casts_cancel(worker: WorkerHarness) -> None:
    _, job_id = worker.call("submit", '{"job": "test_steps", "steps": 500, "step_seconds": 0.02}', worker.pid)
    worker.wait_for(job_id, "progress", timeout=30)
    worker.cast((Atom("cancel"), job_id))
    assert worker.wait_for(job_id, "terminal", timeout=30)[-1].type == "cancelled"


def test_worker_imports_no_torch_and_answers_at_once() -> None:
    code = (
        "import sys, finetune_worker.server.worker, finetune_worker.server.api, finetune_worker.cli, finetune_worker.testing;"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'pydantic') if m in sys.modules];"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    with WorkerHarness() as w:
        assert w.call("info", timeout=30)["queue_length"] == 0


def test_encoded_frame_helpers_match(worker: WorkerHarness) -> None:
    # the harness's own framing and the codec agree with what the worker answers
    call_id = worker.next_id()
    worker.send_frame(encode((Atom("C"), call_id, Atom("finetune_worker"), Atom("jobs"), [])))
    assert worker.wait_reply(call_id).ok
