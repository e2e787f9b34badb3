"""``vitdecomp COMMAND --help`` wall time for every subcommand, as a new user runs it (a fresh
``python -m vitdecomp`` process each time; prints a table).

    python benchmarks/help_times.py [--rounds 5]

Each round runs every subcommand's help once, in turn, so a shared machine's drift hits all alike; the
table shows the median and the range over rounds, the CPU time of the median run, the load average,
and what the target asks (under 1 s). ``python -m vitdecomp --version`` is the floor: the interpreter
and the package's own import.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

TARGET_S = 1.0


def subcommands() -> list[list[str]]:
    """Every subcommand's words (``world export``, ``zoo list``, ...), from the command table."""
    from vitdecomp.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    out = []
    for name, p in sub.choices.items():
        nested = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        out += [[name, n] for a in nested for n in a.choices] if nested else [[name]]
    return out


def timed(words: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of ``python -m vitdecomp WORDS`` (its output discarded)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "vitdecomp", *words], capture_output=True, check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"vitdecomp {' '.join(words)} failed: {proc.stderr.decode()[-500:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rows = [["--version"]] + [[*w, "--help"] for w in subcommands()]
    times: dict[str, list[tuple[float, float]]] = {" ".join(r): [] for r in rows}
    load = os.getloadavg()[0]
    for _ in range(args.rounds):
        for r in rows:
            times[" ".join(r)].append(timed(r))
    print(f"load average {load:.2f} -> {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores, {args.rounds} rounds\n")
    print(f"| {'vitdecomp ...':<24} | median wall s | range s | cpu s | < {TARGET_S:g} s |")
    print("|---|---|---|---|---|")
    for name, ts in times.items():
        walls = sorted(w for w, _ in ts)
        median = statistics.median(walls)
        cpu = statistics.median(c for _, c in ts)
        ok = "yes" if median < TARGET_S else "NO"
        print(f"| {name:<24} | {median:.2f} | {walls[0]:.2f}-{walls[-1]:.2f} | {cpu:.2f} | {ok} |")


if __name__ == "__main__":
    main()
