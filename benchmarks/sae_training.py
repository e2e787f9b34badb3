"""Training a sparse autoencoder on a store of N images: time and peak memory against N (prints a table).

    python benchmarks/sae_training.py [--n 10000 100000] [--dim 768] [--parts 4] [--steps 2000]
        [--root /tmp/sae-bench] [--threads 1] [--window-mib 64] [--measure]

For each N a synthetic store (zarr, the analysis' own format; chunks as ``vitdecomp analyze`` sizes
them) holds N rows of a ``dim``-dim representation with 40 sparse directions plus noise, and ``parts``
contributions that sum to it. Each training runs in a fresh process (:func:`vitdecomp.sae.training.
train_sae`, the command's defaults: ``steps`` Adam steps of 256 images, a tenth of the chunks held out);
its peak resident memory (``ru_maxrss``) and wall time are printed with N, so flat memory reads as the
same peak for 10x the images once both hold more than one window (``--window-mib``: the shuffling
window of representations held at once, the command's 64 MiB by default). ``--measure`` also times
the command's streamed pass over every image (:func:`vitdecomp.apps.latents.measure_latents`:
latents, exact split over the parts, top images).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def build(root: Path, n: int, dim: int, parts: int) -> str:
    """The store of ``n`` synthetic rows under ``root`` (made once); its path."""
    import numpy as np
    import torch

    from vitdecomp.store import StoreKey, open_store

    key = StoreKey("synthetic", "none", tuple(f"p{i}" for i in range(parts)), images=f"n={n}:dim={dim}")
    store = open_store(root, key)
    gen = np.random.default_rng(0)
    basis = torch.from_numpy(gen.standard_normal((40, dim)).astype(np.float32))
    block = 4096
    for s in range(len(store), n, block):
        b = min(block, n - s)
        codes = torch.from_numpy((gen.random((b, 40)) < 0.1) * gen.exponential(1.0, (b, 40))).float()
        rep = codes @ basis + 0.05 * torch.from_numpy(gen.standard_normal((b, dim)).astype(np.float32))
        split = torch.from_numpy(gen.dirichlet(np.ones(parts), b).astype(np.float32))  # [b, parts]
        contributions = split[:, :, None] * rep[:, None]
        store.append([str(i) for i in range(s, s + b)], contributions, rep, torch.zeros(b, 2))
    return str(store.path)


def child(path: str, steps: int, threads: int, window_mib: int, measure: bool) -> None:
    """Train (and measure) in this process; print a JSON line with the figures."""
    import numpy as np
    import torch

    from vitdecomp.sae.training import SaeTrainConfig, train_sae
    from vitdecomp.store import reopen_store

    torch.set_num_threads(threads)
    store = reopen_store(path)
    t0 = time.time()
    trained = train_sae(store, SaeTrainConfig(steps=steps, window_bytes=window_mib << 20), progress=False)
    out = {"n": len(store), "train_s": time.time() - t0, "latents": trained.sae.n_latents, "k": trained.sae.k}
    out["train_peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if measure:
        from vitdecomp.apps.latents import measure_latents

        held = np.zeros(len(store), bool)
        held[trained.split.val] = True
        t1 = time.time()
        m = measure_latents(store, trained.sae, held, progress=False)
        out |= {"measure_s": time.time() - t1, "explained_variance": m.explained_variance, "l0": m.l0}
        out["codes_mib"] = (m.codes.index.nbytes + m.codes.value.nbytes + m.codes.indptr.nbytes) / 2**20
        out["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--parts", type=int, default=4)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--root", default="/tmp/sae-bench")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--window-mib", type=int, default=64)
    p.add_argument("--measure", action="store_true")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.steps, args.threads, args.window_mib, args.measure)
    setup = f"dim {args.dim}, {args.parts} parts, {args.steps} steps, window {args.window_mib} MiB"
    print(f"load average {os.getloadavg()[0]:.1f}; {setup}")
    head = ["images", "store (GB)", "latents (k)", "train time (s)", "train peak (MiB)", "pass (s)", "pass peak (MiB)"]
    print("| " + " | ".join(head) + " |")
    print("|---|---|---|---|---|---|---|")
    for n in args.n:
        path = build(Path(args.root), n, args.dim, args.parts)
        size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e9
        cmd = [sys.executable, __file__, "--child", path, "--steps", str(args.steps), "--threads", str(args.threads)]
        cmd += ["--window-mib", str(args.window_mib)]
        cmd += ["--measure"] if args.measure else []
        r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
        extra = f"{r['measure_s']:.0f} | {r['peak_mib']:.0f}" if args.measure else "- | -"
        fit = f"{r['latents']} ({r['k']}) | {r['train_s']:.0f} | {r['train_peak_mib']:.0f}"
        print(f"| {n} | {size:.2f} | {fit} | {extra} |")


if __name__ == "__main__":
    main()
