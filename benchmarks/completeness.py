"""Completeness of the decomposition per family: max relative error ||sum of parts - output|| / ||output||.

    python benchmarks/completeness.py [--base] [--batch 2] [--models hf-vit hf-clip ...]

Small random-init configs of every family in float64 and float32 (the test configs), and with
``--base`` the paper's base-size architectures (random init) in float32 at their native size.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import timm
import torch

import vitdecomp as vd

BASE = {
    "deit_base_patch16_224": {},
    "vit_base_patch16_224.dino": {},
    "vit_base_patch14_dinov2.lvd142m": {"img_size": 224},
    "swin_base_patch4_window7_224": {},
    "maxvit_small_tf_224": {},
    "deit_base_distilled_patch16_224": {},
    "vit_base_patch16_siglip_224": {},
    "eva02_base_patch14_224.mim_in22k": {},
    "beit_base_patch16_224": {},
    "swinv2_tiny_window8_256": {},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", action="store_true", help="also the base-size models (slow)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--models", nargs="+", default=None, help="test configs to run (default: all)")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from small_models import SMALL_MODELS, representations

    print(f"{'model':34s} {'representation':14s} {'float64':>9s} {'float32':>9s} {'tokens f64':>10s}")
    for name, make in SMALL_MODELS.items():
        if args.models is not None and name not in args.models:
            continue
        model, size = make()
        x = torch.randn(args.batch, 3, size, size)
        for rep in representations(model):
            errs = []
            for dt in (torch.float64, torch.float32):
                model = model.to(dt)
                errs.append(vd.decompose(model, x.to(dt), representation=rep, check=0).error.max().item())
            tok = "n/a"
            if not name.endswith("-padded"):
                d = vd.decompose(model.double(), x.double(), representation=rep, tokens=True, check=0)
                gap = max(
                    (t.values.sum(2) - d.contributions[:, d.index([lab.name for lab in t.labels])]).abs().max().item()
                    for t in d.tokens
                )
                tok = f"{gap:.1e}"
            print(f"{name:34s} {rep or 'default':14s} {errs[0]:9.1e} {errs[1]:9.1e} {tok:>10s}", flush=True)
    if args.base:
        for name, kw in BASE.items():
            model = timm.create_model(name, pretrained=False, **kw).eval()
            size = model.pretrained_cfg["input_size"][1:] if "img_size" not in kw else (kw["img_size"],) * 2
            d = vd.decompose(model, torch.randn(args.batch, 3, *size), check=0)
            print(f"{name:34s} {'default':14s} {'':9s} {d.error.max().item():9.1e} {'':>10s}", flush=True)
        clip = vd.load_model("open_clip:ViT-B-16", pretrained=False)
        d = vd.decompose(clip, torch.randn(args.batch, 3, 224, 224), check=0)
        print(f"{'open_clip:ViT-B-16':34s} {'default':14s} {'':9s} {d.error.max().item():9.1e} {'':>10s}")


if __name__ == "__main__":
    main()
