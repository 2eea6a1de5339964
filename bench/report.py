"""Where results go: a rich table on the terminal and a dated section appended to BENCHMARKS.md.

Every section records what a reader needs to trust or redo the numbers: date, machine (CPU
model, cores, RAM, GPU), library versions, the git commit, the exact command, and how long the
run took.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.common import REPO, Row

PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes", "erlang_py")


def machine() -> dict[str, Any]:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) * 1024
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": cores, "ram_bytes": ram, "gpu": _gpu_name(), "os": platform.platform()}


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("finetune-worker", *PACKAGES):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    out["otp"] = _otp_release()
    out["git"] = _git_commit()
    return out


def render_table(rows: list[Row], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for column in ("Part", "Measurement", "Value", "Compared", "Target", "Verdict"):
        table.add_column(column, overflow="fold")
    for row in rows:
        verdict = row.verdict
        style = "green" if verdict == "met" else ("bold red" if verdict else "")
        note = f" ({row.note})" if row.note else ""
        table.add_row(
            row.part,
            row.name,
            row.value + note,
            row.compare,
            row.target,
            f"[{style}]{verdict}[/]" if style else "",
        )
    Console(width=200).print(table)


def markdown(rows: list[Row], *, command: str, started: dt.datetime, seconds: float, quick: bool) -> str:
    m, v = machine(), versions()
    ram = f"{m['ram_bytes'] / 2**30:.1f} GiB RAM" if m["ram_bytes"] else "RAM unknown"
    lines = [
        f"## {started:%Y-%m-%d %H:%M} UTC{' (quick mode: tiny sizes, not a measurement)' if quick else ''}",
        "",
        f"- Command: `{command}` ({_duration(seconds)})",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {ram}, GPU: {m['gpu'] or 'none'}; {m['os']}",
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        "",
        "| Part | Measurement | Value | Compared | Target | Verdict | Note |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        cells = [row.part, row.name, row.value, row.compare, row.target, row.verdict, row.note]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    missed = [r for r in rows if r.met is False]
    lines.append("")
    if missed:
        lines.append("Targets missed in this run: " + "; ".join(f"{r.part}: {r.name}" for r in missed) + ".")
    elif any(r.met for r in rows):
        lines.append("Every target with a verdict was met in this run.")
    lines.append("")
    return "\n".join(lines)


def append(path: Path, section: str) -> None:
    if not path.exists() or not path.read_text(encoding="utf-8").strip():
        path.write_text(_HEADER, encoding="utf-8")
    with path.open("a", encoding="utf-8") as f:
        f.write("\n" + section)


def dump_json(path: Path, rows: list[Row], **meta: Any) -> None:
    data = {
        **meta,
        "machine": machine(),
        "versions": versions(),
        "rows": [
            {k: getattr(r, k) for k in ("part", "name", "value", "compare", "target", "met", "note", "data")}
            for r in rows
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")


_HEADER = """# Benchmarks

Results of `make bench` (`python -m bench.run`), newest last. Each section names the machine,
the versions and the command that produced it; see `bench/` for what each part measures and
issue 6 ("Benchmarks") for the targets. Ratios compare variants measured interleaved in the
same run: on shared CPUs absolute numbers move from minute to minute, ratios hold.
"""


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def _gpu_name() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # a broken CUDA install must not stop a CPU benchmark
        return None
    return None


def _otp_release() -> str:
    try:
        out = subprocess.run(
            ["erl", "-noshell", "-eval", 'io:format("~s", [erlang:system_info(otp_release)]), halt().'],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"


def _git_commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return f"{head}{'+dirty' if dirty else ''}" if head else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
