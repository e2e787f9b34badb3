"""Speed and peak memory of the decomposition against the plain forward pass (prints a table).

    python benchmarks/decompose_speed.py [--models deit_base_patch16_224 ...] [--batch 8] [--threads 2]

Each (model, mode) runs in its own process so that peak RSS is that mode's own. Random-init weights
(speed does not depend on the values). Modes: forward (the model's own forward, fused attention as
shipped), heads, heads+tokens.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

DEFAULT_MODELS = ["deit_base_patch16_224", "swin_base_patch4_window7_224", "maxvit_small_tf_224"]
MODES = ["forward", "heads", "tokens"]


def run_one(model_name: str, mode: str, batch: int, threads: int, repeats: int, tokens: str) -> dict:
    import timm
    import torch

    import vitdecomp as vd

    torch.set_num_threads(threads)
    model = timm.create_model(model_name, pretrained=False).eval()
    size = model.pretrained_cfg["input_size"][1:]
    x = torch.randn(batch, 3, *size)
    token_layers: bool | list[int] = True
    if tokens != "all":
        token_layers = [int(i) for i in tokens.split(",")]

    def step():
        if mode == "forward":
            with torch.inference_mode():
                return model(x)
        return vd.decompose(model, x, tokens=token_layers if mode == "tokens" else False)

    out = step()  # warm-up
    result_bytes = 0
    if mode != "forward":
        result_bytes = out.contributions.numel() * out.contributions.element_size()
        result_bytes += sum(t.values.numel() * t.values.element_size() for t in out.tokens)
        err = out.error.max().item()
    else:
        err = 0.0
    del out
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = step()
        times.append(time.perf_counter() - t0)
        del out
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": statistics.median(times), "peak_bytes": peak, "result_bytes": result_bytes, "error": err}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", default="all", help="'all' or comma-separated layer indices for heads+tokens")
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], args.batch, args.threads, args.repeats, args.tokens)))
        return
    print(f"batch {args.batch}, {args.threads} threads, median of {args.repeats}, CPU, random-init weights")
    print(f"{'model':32s} {'mode':8s} {'img/s':>7s} {'x fwd':>6s} {'peak GiB':>8s} {'result GiB':>10s} {'rel.err':>8s}")
    for name in args.models:
        base = None
        for mode in MODES:
            cmd = [
                sys.executable,
                __file__,
                "--one",
                name,
                mode,
                "--batch",
                str(args.batch),
                "--threads",
                str(args.threads),
                "--repeats",
                str(args.repeats),
                "--tokens",
                args.tokens,
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            base = base or r["seconds"]
            print(
                f"{name:32s} {mode:8s} {args.batch / r['seconds']:7.2f} {r['seconds'] / base:6.2f} "
                f"{r['peak_bytes'] / 2**30:8.2f} {r['result_bytes'] / 2**30:10.3f} {r['error']:8.1e}",
                flush=True,
            )


if __name__ == "__main__":
    main()
