"""Run the benchmarks and write bench/RESULTS.md from this run's own output.

Each benchmark script prints its own summary. This runs them one after another, shows their output as it
comes, and writes RESULTS.md: the commit and the host it ran on (cores, CPU, Python, torch), then, per
benchmark, the command and what it printed. Every number in RESULTS.md comes from the run that wrote it;
rerun ``make bench`` for current ones.

    python bench/results.py [--out bench/RESULTS.md] [--only NAME ...]

``--only`` runs the named benchmarks only (names below); the file then says which ran.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

BENCHES: dict[str, tuple[str, list[str]]] = {
    "measure": (
        "sp.measure against the same gradient work without it, a one-sum floor, per-layer .item() hooks "
        "and TorchLens, on a 50-layer CNN",
        ["bench/measure_overhead.py"],
    ),
    "lsuv": (
        "sp.fix.lsuv_ against the lsuv package on a 50-layer CNN: time, forward passes, worst |std - 1|",
        ["bench/lsuv.py"],
    ),
    "monitor": (
        "sp.Monitor(every=1) against a plain training step of a 20-layer CNN, glibc's default allocator",
        ["bench/monitor.py"],
    ),
    "monitor-steady": (
        "the same with glibc told to keep freed memory",
        ["bench/monitor.py", "--steady-allocator"],
    ),
    "predict": (
        "sp.predict against sp.measure (measured / predicted variance per layer), capture and predict times",
        ["bench/predict.py"],
    ),
}


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return ""
    return out.stdout.strip()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host() -> dict[str, str]:
    """Where and on what this run happens: commit, cores, CPU, versions."""
    commit = _git("rev-parse", "HEAD") or "unknown"
    if _git("status", "--porcelain", "--untracked-files=no"):
        commit += " (with uncommitted changes)"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "commit": commit,
        "date (UTC)": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "cores": f"{os.cpu_count()} ({usable} usable by this process)",
        "CPU": _cpu_model(),
        "Python": platform.python_version(),
        "torch": torch.__version__,
        "OS": platform.platform(),
    }


def run(cmd: list[str]) -> tuple[int, str, float]:
    """Run one benchmark, echo its output line by line, return (exit status, output, seconds)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, *cmd],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        lines.append(line)
    return proc.wait(), "".join(lines), time.perf_counter() - t0


def render(info: dict[str, str], results: list[tuple[str, list[str], int, str, float]], partial: bool) -> str:
    out = [
        "# Benchmark results",
        "",
        "Written by `make bench` (`python bench/results.py`) from its own run; do not edit by hand.",
        "",
    ]
    out += [f"- {k}: {v}" for k, v in info.items()]
    if partial:
        out.append(f"- partial run: {', '.join(name for name, *_ in results)} only")
    for name, cmd, status, text, seconds in results:
        desc = BENCHES[name][0]
        out += [
            "",
            f"## {name}",
            "",
            f"{desc}.",
            "",
            f"`python {' '.join(cmd)}`: {seconds:.0f} s" + ("" if status == 0 else f", exit status {status}"),
            "",
            "```",
            text.rstrip("\n"),
            "```",
        ]
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "RESULTS.md")
    ap.add_argument("--only", nargs="+", choices=sorted(BENCHES), help="run these benchmarks only")
    args = ap.parse_args()
    names = args.only or list(BENCHES)
    info = host()
    results = []
    for name in names:
        cmd = BENCHES[name][1]
        print(f"== {name}: python {' '.join(cmd)}", flush=True)
        status, text, seconds = run(cmd)
        results.append((name, cmd, status, text, seconds))
    args.out.write_text(render(info, results, partial=args.only is not None))
    print(f"wrote {args.out}")
    return 1 if any(status for _, _, status, _, _ in results) else 0


if __name__ == "__main__":
    sys.exit(main())
