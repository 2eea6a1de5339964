"""``finetune-worker``: the console script (also ``python -m finetune_worker``).

Launch forms (docs/protocol.md, "Launch forms")::

    finetune-worker port [--packet N] [--use_stdio|--nouse_stdio] [--compressed N]
                         [--buffer_size N] [--grace S] [--max_frame_size N]
    finetune-worker -V                                   # "Python 3.11.7", as ErlPort expects
    finetune-worker -u -m erlport.cli --packet=4 --use_stdio --compressed=0 --buffer_size=65536
    finetune-worker run CONFIG.json [--json] [--grace S]
    finetune-worker validate CONFIG.json
    finetune-worker chat MODEL_OR_RUN_DIR [--adapter DIR] [--temperature T]
    finetune-worker schema
    finetune-worker atoms                                # every atom the worker sends, for [safe]
    finetune-worker make-tiny-model DIR

The ErlPort forms exist so that ``python:start([{python, "/path/to/finetune-worker"}])`` drives
the worker unchanged: ErlPort runs ``<python> -V`` first, then starts ``erlport.cli`` with its
port options. Logs always go to stderr; in port mode stdout carries frames only.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import signal
import sys
import threading
from typing import Any, NoReturn

import finetune_worker

log = logging.getLogger("finetune_worker.cli")

#: Exit statuses of ``run`` (130 = 128 + SIGINT, what shells report for Ctrl-C; 143 = 128 +
#: SIGTERM, what Slurm, Kubernetes and systemd expect from a job they told to stop).
EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_CANCELLED, EXIT_TERMINATED = 0, 1, 2, 130, 143


def _default_grace() -> float:
    try:
        return float(os.environ.get("FINETUNE_WORKER_GRACE", "10"))
    except ValueError:
        return 10.0


def _add_port_options(p: argparse.ArgumentParser) -> None:
    from finetune_worker.wire.port import DEFAULT_BUFFER_SIZE, DEFAULT_MAX_FRAME

    p.add_argument(
        "--packet", type=int, choices=(1, 2, 4), default=4, help="length prefix bytes ({packet, N})"
    )
    stdio = p.add_mutually_exclusive_group()
    stdio.add_argument("--use_stdio", "--use-stdio", dest="use_stdio", action="store_true", default=True)
    stdio.add_argument(
        "--nouse_stdio", "--nouse-stdio", dest="use_stdio", action="store_false", help="frames on fds 3/4"
    )
    p.add_argument("--compressed", type=int, choices=range(10), default=0, metavar="0-9", help="zlib level")
    p.add_argument("--buffer_size", "--buffer-size", type=int, default=DEFAULT_BUFFER_SIZE, help="read size")
    p.add_argument(
        "--max_frame_size",
        "--max-frame-size",
        type=int,
        default=DEFAULT_MAX_FRAME,
        help="bigger frames are dropped",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=_default_grace(),
        help="seconds a cancelled job gets to save at shutdown (env FINETUNE_WORKER_GRACE, default 10)",
    )
    warm = p.add_mutually_exclusive_group()
    warm.add_argument(
        "--warm",
        dest="warm",
        action="store_true",
        default=None,
        help="import torch/transformers in the background at start, so the first job starts sooner "
        "(the default; env FINETUNE_WORKER_WARM=0 turns it off)",
    )
    warm.add_argument(
        "--no-warm",
        dest="warm",
        action="store_false",
        help="import the training stack only when a job needs it (a worker that may never train)",
    )


def _add_allowed_root(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allowed-root",
        "--allowed_root",
        dest="allowed_root",
        action="append",
        default=[],
        metavar="PATH",
        help="confine every job path to PATH (repeatable; env FINETUNE_WORKER_ALLOWED_ROOTS=/a:/b)",
    )


EXAMPLES = """\
examples:
  finetune-worker run configs/tiny-lora.json           train with a live display
  finetune-worker run configs/tiny-mixture.yaml --set training_parameters.learning_rate=1e-4
  finetune-worker validate my-job.yaml                 every problem, with its line, before any model loads
  finetune-worker run job.json --json | jq .type       events as JSON lines
  finetune-worker port --packet 4                      what an Elixir Port or ErlPort starts
  finetune-worker chat runs/tiny-lora                  talk to the fine-tuned run (adapter applied)
  finetune-worker schema > job.schema.json             JSON Schema for editors and validators

docs: docs/configs.md (every key), docs/protocol.md (the port's messages)
"""

SET_HELP = (
    "override a config key, KEY a dotted path (training_parameters.learning_rate, "
    "dataset.sources[1].weight), VALUE read as YAML (3, 1e-4, true, [q_proj, v_proj]); repeatable"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finetune-worker",
        description="LLM fine-tuning worker for the BEAM (ErlPort-compatible port).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"finetune-worker {finetune_worker.__version__}"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    port = sub.add_parser("port", help="serve the BEAM over a port (stdio frames)")
    _add_port_options(port)
    _add_allowed_root(port)

    run = sub.add_parser(
        "run",
        help="run one job in this terminal with live progress",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("config", help="job config (JSON or YAML file)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    run.add_argument("--json", action="store_true", help="print events as JSON lines instead")
    run.add_argument(
        "--verbose",
        action="store_true",
        help="let third-party warnings and progress bars print (by default they go to the output folder's worker.log)",
    )
    run.add_argument("--grace", type=float, default=_default_grace(), help="seconds to save after a cancel")
    _add_allowed_root(run)

    val = sub.add_parser("validate", help="check a job config and print every problem")
    val.add_argument("config", help="job config (JSON or YAML file)")
    val.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    _add_allowed_root(val)

    from finetune_worker.cli import chat

    chat.add_parser(sub)
    sub.add_parser("schema", help="print the JSON schema of job configs")
    sub.add_parser(
        "atoms",
        help="print every atom the worker sends, as an Erlang term file for file:consult/1 "
        "(declare them before binary_to_term(B, [safe]))",
    )

    tiny = sub.add_parser("make-tiny-model", help="build the tiny offline test model into DIR")
    tiny.add_argument("dir")
    tiny.add_argument(
        "--size",
        choices=["tiny", "small", "medium"],
        default="tiny",
        help="tiny: tests and demo; small: benchmarks; medium: 58M parameters, a 32k-token head",
    )
    tiny.add_argument(
        "--seed", type=int, default=0, help="initial weights seed (two seeds give two mergeable models)"
    )
    tiny.add_argument("--overwrite", action="store_true", help="replace DIR if it holds something else")
    return parser


def _erlport_args(argv: list[str]) -> list[str] | None:
    """``-u -m erlport.cli OPTIONS`` -> ``port OPTIONS``; None when argv is not ErlPort's form."""
    rest = list(argv)
    while rest and rest[0] in ("-u", "-B", "-E", "-s"):  # interpreter flags ErlPort may pass
        rest.pop(0)
    if len(rest) >= 2 and rest[0] == "-m" and rest[1] == "erlport.cli":
        return ["port", *rest[2:]]
    if rest and rest[0] == "-merlport.cli":
        return ["port", *rest[1:]]
    return None


def _setup_logging() -> None:
    level = os.environ.get("FINETUNE_WORKER_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level, logging.INFO),
        format=f"finetune-worker[{os.getpid()}] %(levelname)s %(name)s: %(message)s",
    )


def entry() -> NoReturn:
    """The ``finetune-worker`` program: :func:`main`, then an exit without the interpreter's
    finalization (``server.worker.exit_process``: ~1.5 s once torch is loaded, after every run)."""
    try:
        code = main()
    except BrokenPipeError:
        # The reader went away (`finetune-worker schema | head`): nothing to report. Later writes
        # (the flush on exit) go nowhere instead of failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_OK
    from finetune_worker.server.worker import exit_process

    exit_process(code)


def main(argv: list[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["-V"]:
        print(f"Python {platform.python_version()}")
        return 0
    erlport = _erlport_args(args_list)
    args = build_parser().parse_args(erlport if erlport is not None else args_list)
    _setup_logging()
    # OpenMP threads that spin while idle starve the main thread (calls) and any other process on
    # the machine; measured 20-40x slower CPU training under load without this. Users may override.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if getattr(args, "allowed_root", None):
        from finetune_worker.security import set_allowed_roots

        set_allowed_roots(args.allowed_root)
    command = args.command
    if command == "port":
        return cmd_port(args)
    if command == "run":
        return cmd_run(args)
    if command == "validate":
        return cmd_validate(args)
    if command == "chat":
        from finetune_worker.cli.chat import cmd_chat

        return cmd_chat(args)
    if command == "schema":
        return cmd_schema()
    if command == "atoms":
        print(atoms_file(), end="")
        return EXIT_OK
    if command == "make-tiny-model":
        return cmd_make_tiny_model(args)
    raise AssertionError(command)  # argparse rejects unknown subcommands


def cmd_port(args: argparse.Namespace) -> int:
    from finetune_worker.server.worker import serve
    from finetune_worker.wire.port import open_port

    port = open_port(
        packet=args.packet,
        use_stdio=args.use_stdio,
        compressed=args.compressed,
        buffer_size=args.buffer_size,
        max_frame_size=args.max_frame_size,
    )
    log.info(
        "serving on %s (packet %d, pid %d)",
        "stdio" if args.use_stdio else "fds 3/4",
        args.packet,
        os.getpid(),
    )
    from finetune_worker.server.warmup import enabled_by_env

    return serve(port, grace_s=args.grace, warm=enabled_by_env() if args.warm is None else args.warm)


def _load(path: str, overrides: list[str] | None = None) -> tuple[str, Any]:
    from finetune_worker.config import parse_job_config

    return parse_job_config(("file", path), overrides or ())


def cmd_validate(args: argparse.Namespace) -> int:
    from finetune_worker.errors import ConfigError

    try:
        kind, _ = _load(args.config, args.set)
    except ConfigError as exc:
        print(f"{args.config}: {len(exc.issues)} problem(s)")
        for issue in exc.issues:
            print(f"  {issue}")
        return EXIT_INVALID
    print(f"{args.config}: valid {kind} config")
    return EXIT_OK


def cmd_schema() -> int:
    from finetune_worker.config import json_schema

    print(json.dumps(json_schema(), indent=2))
    return EXIT_OK


def atoms_file() -> str:
    """The Erlang term file of ``finetune-worker atoms`` (and docs/finetune_worker_atoms.eterm).

    ``{ok, [Atoms]} = file:consult(Path)`` creates every atom the worker can send, so the frames
    it sends then decode with ``binary_to_term(B, [safe])``.
    """
    from finetune_worker.server.api import PROTOCOL_VERSION
    from finetune_worker.wire.vocabulary import atom_vocabulary

    def quoted(name: str) -> str:
        return "'" + name.replace("\\", "\\\\").replace("'", "\\'") + "'"

    lines = ",\n ".join(quoted(a) for a in atom_vocabulary())
    return (
        f"%% Every atom finetune-worker sends in protocol {PROTOCOL_VERSION} (`finetune-worker atoms`).\n"
        "%% {ok, [Atoms]} = file:consult(ThisFile) declares them all; then binary_to_term(Frame, [safe])\n"
        "%% decodes every frame the worker sends.\n"
        f"[{lines}].\n"
    )


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from finetune_worker.testing.tiny import build_tiny_model

    try:
        path = build_tiny_model(args.dir, size=args.size, seed=args.seed, overwrite=args.overwrite)
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    print(path)
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    """One job, in process, through the same JobManager the port uses."""
    from finetune_worker.errors import ConfigError
    from finetune_worker.server.jobs import JobManager

    try:
        kind, model = _load(args.config, args.set)
        unanswerable: list[Any] = getattr(model, "subscriber_issues", list)()  # standalone: no BEAM to ask
        if unanswerable:
            raise ConfigError(unanswerable)
    except ConfigError as exc:
        print(f"{args.config}: {len(exc.issues)} problem(s)", file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return EXIT_INVALID

    if args.json:
        from finetune_worker.cli.render import JsonLines
        from finetune_worker.wire.port import protect_stdout

        # Libraries print to stdout; keep the JSON lines a clean stream by sending them to a
        # private dup of fd 1 and pointing fd 1 at stderr, as port mode does for frames.
        sink: Any = JsonLines(os.fdopen(protect_stdout(), "w", buffering=1, encoding="utf-8"))
    else:
        from finetune_worker.cli.render import Renderer

        sink = Renderer()
    log_file = None
    if not args.json and not args.verbose:
        from finetune_worker.cli.quiet import capture_third_parties

        log_file = capture_third_parties()

    finished = threading.Event()
    reader_gone = threading.Event()
    outcome: dict[str, Any] = {}

    def on_event(record: Any, event: Any) -> None:
        try:
            if not reader_gone.is_set():
                sink(record, event)
        except (BrokenPipeError, SystemExit):
            # The reader closed the pipe (`run job.json | head`); rich exits on that, and from
            # this thread that would leave the main thread waiting for ever. Stop as Ctrl-C does.
            reader_gone.set()
            manager.cancel(event.job_id)
        finally:
            if event.terminal:
                outcome["type"] = event.type
                outcome["payload"] = event.payload
                finished.set()

    manager = JobManager(on_event, job_prefix="run")
    job_id = manager.submit(kind, model)
    interrupts = 0

    def on_sigint(signum: int, frame: Any) -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1:
            print("\ncancelling at the next step boundary (Ctrl-C again to quit now)", file=sys.stderr)
            manager.cancel(job_id)
        else:
            sys.stderr.flush()
            os._exit(EXIT_CANCELLED)

    terminated = threading.Event()

    def on_sigterm(signum: int, frame: Any) -> None:
        # A scheduler's stop (Slurm, Kubernetes, systemd): save at the next step and exit 143.
        if not terminated.is_set():
            terminated.set()
            print("\nSIGTERM: cancelling at the next step boundary and saving a checkpoint", file=sys.stderr)
            manager.cancel(job_id)

    previous = signal.signal(signal.SIGINT, on_sigint)
    previous_term = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        while not finished.wait(0.2):  # short waits keep the main thread responsive to signals
            pass
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, previous_term)
        manager.close(args.grace)
        close = getattr(sink, "close", None)
        if close is not None and not reader_gone.is_set():
            close()
        if log_file is not None:
            from finetune_worker.cli.quiet import keep_log

            kept = keep_log(log_file, model, outcome.get("type"))
            print(f"third-party warnings and logs: {kept} (--verbose prints them)", file=sys.stderr)
    if terminated.is_set() and outcome.get("type") == "cancelled":
        checkpoint = (outcome.get("payload") or {}).get("checkpoint")
        how = (
            f"run the same command again to resume from {checkpoint}"
            + ("" if getattr(model, "resume", "auto") == "auto" else ' (with "resume": "auto" in the config)')
            if checkpoint
            else "no checkpoint was written; the run starts over when run again"
        )
        print(f"stopped by SIGTERM: {how}", file=sys.stderr)
        return EXIT_TERMINATED
    if reader_gone.is_set():
        checkpoint = (outcome.get("payload") or {}).get("checkpoint")
        where = f" (checkpoint {checkpoint})" if checkpoint else ""
        print(f"the output's reader closed the pipe: the job stopped{where}", file=sys.stderr)
    return {"completed": EXIT_OK, "cancelled": EXIT_CANCELLED}.get(outcome.get("type", ""), EXIT_FAILED)
