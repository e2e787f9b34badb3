"""Directional token maps (8 directions, every layer's heads) against the plain forward, timed side by
side in one process (prints a table).

    python benchmarks/token_maps.py [--models deit_base_patch16_224 ...] [--batch 8] [--threads 2]
        [--rounds 3] [--directions 8] [--full-tokens] [--clock wall|cpu]

Forward, heads-only decomposition and token maps alternate on the same batch, so a shared machine's
drift hits them alike; each ratio is the median over rounds of (its time / the forward's time in the
same round). ``--full-tokens`` also times ``tokens=True`` (every head's ``[tokens x D]``
contributions), the thing the maps avoid. ``--clock cpu`` times the process's CPU time (with ``--threads 1``
on a machine shared with other jobs: the work done, not the wait for a core). Random-init weights.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from heads_overhead import build

DEFAULT_MODELS = [
    "deit_base_patch16_224",
    "swin_base_patch4_window7_224",
    "maxvit_small_tf_224",
    "open_clip:ViT-B-16",
]


def measure(name: str, batch: int, rounds: int, k: int, full: bool, clock=time.perf_counter) -> dict[str, float]:
    import torch

    import vitdecomp as vd

    forward_module, model, size = build(name)
    x = torch.randn(batch, 3, *size)
    with torch.inference_mode():
        d_out = vd.decompose(model, x[:1]).representation.shape[-1]
    u = torch.nn.functional.normalize(torch.randn(k, d_out, generator=torch.Generator().manual_seed(0)), dim=-1)

    def forward() -> None:
        with torch.inference_mode():
            forward_module(x)

    runs = {
        "forward": forward,
        "heads": lambda: vd.decompose(model, x),
        "maps": lambda: vd.decompose(model, x, token_directions=u),
    }
    if full:
        runs["full_tokens"] = lambda: vd.decompose(model, x, tokens=True)
    for fn in runs.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {key: [] for key in runs}
    for _ in range(rounds):
        for key, fn in runs.items():
            t0 = clock()
            fn()
            times[key].append(clock() - t0)
    out = {f"{key}_s": statistics.median(t) for key, t in times.items()}
    for key in runs:
        if key != "forward":
            ratios = [a / f for a, f in zip(times[key], times["forward"], strict=True)]
            out[f"{key}_ratio"], out[f"{key}_spread"] = statistics.median(ratios), (min(ratios), max(ratios))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--directions", type=int, default=8)
    ap.add_argument("--full-tokens", action="store_true")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="wall time, or the process's CPU time")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print(
        f"batch {args.batch}, {args.threads} threads, {args.clock} clock, {args.directions} directions, "
        f"median of {args.rounds} alternating rounds (spread: min–max over rounds)"
    )
    print(
        "| model | forward s | heads / forward | maps / forward | maps spread |"
        + (" full tokens / forward |" if args.full_tokens else "")
        + " load avg |"
    )
    print("|---|---|---|---|---|" + ("---|" if args.full_tokens else "") + "---|")
    for name in args.models:
        r = measure(name, args.batch, args.rounds, args.directions, args.full_tokens, clock)
        lo, hi = r["maps_spread"]
        row = f"| {name} | {r['forward_s']:.3f} | {r['heads_ratio']:.2f}x | {r['maps_ratio']:.2f}x"
        row += f" | {lo:.2f}–{hi:.2f} |"
        if args.full_tokens:
            row += f" {r['full_tokens_ratio']:.2f}x |"
        print(row + f" {os.getloadavg()[0]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
