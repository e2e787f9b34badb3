"""The default ``vitdecomp analyze``, cold and warm, side by side with another checkout (issue 22 point 4).

    python benchmarks/analyze_time.py                                   # this checkout alone
    python benchmarks/analyze_time.py --baseline-src ../main/src --rounds 3

Each checkout (its ``src`` on ``PYTHONPATH``) runs the built-in default ``vitdecomp analyze`` in a child
process: first cold (an empty cache of its own: decomposition, CompAlign training, text embeddings),
then ``--rounds`` warm runs (the same cache), the two checkouts alternating so that both see the same
load. Printed per run: the wall time (start-up included), the CPU time, ``results.json``'s stage
timings and the load average; then the median warm time of each and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1] / "src"


def run(src: Path, cache: Path, out: Path) -> tuple[float, float, dict[str, float]]:
    """One default ``analyze`` with ``src`` first on the path: ``(wall s, CPU s of the child and its
    workers, stage timings)``; on a loaded machine the CPU time is the better guess of a quiet wall time
    (the zoo models run on one thread)."""
    env = {**os.environ, "PYTHONPATH": str(src), "VITDECOMP_CACHE": str(cache)}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "vitdecomp", "analyze", "--out", str(out), "--quiet"], env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"analyze failed with {src}")
    return wall, usage.ru_utime + usage.ru_stime, json.loads((out / "results.json").read_text())["timings_s"]


def show(name: str, kind: str, wall: float, cpu: float, timings: dict[str, float]) -> None:
    stages = ", ".join(f"{k} {v:.1f}" for k, v in timings.items() if k != "total")
    print(f"| {name} | {kind} | {wall:.1f} | {cpu:.1f} | {stages} | {os.getloadavg()[0]:.1f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline-src", type=Path, default=None, help="another checkout's src/ to compare with")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vitdecomp-time-"))
    checkouts = {"this": HERE} | ({"baseline": args.baseline_src.resolve()} if args.baseline_src else {})
    print("| checkout | run | wall s | CPU s | stages s (results.json) | load average |")
    print("|---|---|---|---|---|---|")
    warm: dict[str, list[float]] = {name: [] for name in checkouts}
    cpus: dict[str, list[float]] = {name: [] for name in checkouts}
    for name, src in checkouts.items():
        show(name, "cold", *run(src, work / name / "cache", work / name / "out"))
    for _ in range(args.rounds):
        for name, src in checkouts.items():
            wall, cpu, timings = run(src, work / name / "cache", work / name / "out")
            warm[name].append(wall)
            cpus[name].append(cpu)
            show(name, "warm", wall, cpu, timings)
    med = {name: statistics.median(v) for name, v in warm.items() if v}
    for name, m in med.items():
        lo, hi = min(warm[name]), max(warm[name])
        cpu = statistics.median(cpus[name])
        print(
            f"{name}: median warm {m:.1f} s (CPU {cpu:.1f} s) over {len(warm[name])} rounds (spread {lo:.1f}-{hi:.1f})"
        )
    if len(med) == 2:
        print(f"this / baseline, warm: {med['this'] / med['baseline']:.2f}x")


if __name__ == "__main__":
    main()
