"""Heads-only decomposition against the plain forward, timed side by side in one process (prints a table).

    python benchmarks/heads_overhead.py [--models deit_base_patch16_224 open_clip:ViT-B-16 ...] [--batch 8]
        [--threads 2] [--rounds 5]

Forward and decomposition alternate on the same batch, so a shared machine's drift hits both alike; the
ratio is the median over rounds of (decomposition time / forward time). Random-init weights.
"""

from __future__ import annotations

import argparse
import statistics
import time

DEFAULT_MODELS = [
    "deit_base_patch16_224",
    "deit_base_distilled_patch16_224",
    "open_clip:ViT-B-16",
    "vit_base_patch16_siglip_224",
    "eva02_base_patch14_224.mim_in22k",
    "beit_base_patch16_224",
    "swin_base_patch4_window7_224",
    "swinv2_tiny_window8_256",
    "maxvit_small_tf_224",
]


def build(name: str):
    """``(model, decomposable target, image size)`` for a timm name or ``open_clip:ARCH``."""
    if name.startswith("open_clip:"):
        import open_clip

        model = open_clip.create_model(name.split(":", 1)[1], pretrained=None).eval()
        size = model.visual.image_size
        return model.visual, model, size if isinstance(size, tuple) else (size, size)
    import timm

    model = timm.create_model(name, pretrained=False).eval()
    return model, model, tuple(model.pretrained_cfg["input_size"][1:])


def measure(name: str, batch: int, rounds: int) -> tuple[float, float, float]:
    import torch

    import vitdecomp as vd

    forward_module, model, size = build(name)
    x = torch.randn(batch, 3, *size)

    def forward() -> None:
        with torch.inference_mode():
            forward_module(x)

    def heads() -> None:
        vd.decompose(model, x)

    forward(), heads()  # warm-up
    ratios, fwd, dec = [], [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        forward()
        t1 = time.perf_counter()
        heads()
        t2 = time.perf_counter()
        fwd.append(t1 - t0)
        dec.append(t2 - t1)
        ratios.append((t2 - t1) / (t1 - t0))
    return statistics.median(fwd), statistics.median(dec), statistics.median(ratios)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    print(f"batch {args.batch}, {args.threads} threads, median of {args.rounds} alternating rounds")
    print("| model | forward s | heads s | heads / forward |")
    print("|---|---|---|---|")
    for name in args.models:
        f, d, r = measure(name, args.batch, args.rounds)
        print(f"| {name} | {f:.3f} | {d:.3f} | {r:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
