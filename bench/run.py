"""``make bench``: run the benchmark parts, print one table, append the results to BENCHMARKS.md.

    python -m bench.run                                # every part (about 12 minutes on 2 CPU cores)
    python -m bench.run --part codec,framing --quick   # a subset, at smoke-test sizes

A part that fails becomes an error row (the others still run) and the exit status is 1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import shlex
import sys
import time
import traceback
from pathlib import Path

from bench.common import REPO, Options, Row

#: part name -> module; the order is the order they run in (cheap ones first).
PARTS: dict[str, str] = {
    "codec": "bench.codec",
    "framing": "bench.framing",
    "startup": "bench.latency",
    "latency": "bench.latency",
    "events": "bench.events",
    "train": "bench.train",
    "batching": "bench.batching",
    "peers": "bench.peers",
    "memory": "bench.memory",
    "data": "bench.datamem",
    "gpu": "bench.gpu",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--part",
        default=",".join(PARTS),
        help=f"comma-separated parts to run, in any order (default: all of {', '.join(PARTS)})",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes: checks that it works, measures nothing"
    )
    parser.add_argument("--rounds", type=int, default=None, help="interleaved A/B/C rounds (default 2)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per A/B/C run (default 100)")
    parser.add_argument("--work-dir", type=Path, default=None, help="scratch space (default: runs/bench)")
    parser.add_argument(
        "--record",
        type=Path,
        default=REPO / "BENCHMARKS.md",
        help="markdown file the results section is appended to (default: BENCHMARKS.md)",
    )
    parser.add_argument("--no-record", action="store_true", help="print the table only")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.part.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"--part: unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    args.parts = [p for p in PARTS if p in parts]
    return args


def run_part(name: str, opts: Options) -> list[Row]:
    module = importlib.import_module(PARTS[name])
    runner = getattr(module, f"run_{name}", None) or module.run
    return list(runner(opts))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.monotonic()

    def log(message: str) -> None:
        print(f"[bench {time.monotonic() - t0:6.1f}s] {message}", file=sys.stderr, flush=True)

    opts = Options.make(args.quick, args.work_dir, log)
    if args.rounds is not None:
        opts.rounds = max(1, args.rounds)
    if args.steps is not None:
        opts.steps = max(1, args.steps)
    rows: list[Row] = []
    failed = False
    for name in args.parts:
        log(f"part {name}: start")
        part_t0 = time.monotonic()
        try:
            rows.extend(run_part(name, opts))
        except Exception as exc:
            failed = True
            log(f"part {name} failed:\n{traceback.format_exc()}")
            rows.append(Row(name, "ERROR", f"{type(exc).__name__}: {exc}"[:300], met=False))
        log(f"part {name}: done in {time.monotonic() - part_t0:.1f}s")
    seconds = time.monotonic() - t0

    from bench import report

    command = "python -m bench.run " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    report.render_table(
        rows, f"finetune-worker benchmarks ({'quick' if args.quick else 'full'}, {seconds:.0f} s)"
    )
    if args.json:
        report.dump_json(args.json, rows, command=command, started=started.isoformat(), seconds=seconds)
    if not args.no_record:
        section = report.markdown(
            rows, command=command.strip(), started=started, seconds=seconds, quick=args.quick
        )
        report.append(args.record, section)
        log(f"results appended to {args.record}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
