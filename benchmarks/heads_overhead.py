"""Heads-only decomposition against the plain forward, timed side by side in one process (prints a table).

    python benchmarks/heads_overhead.py [--models deit_base_patch16_224 open_clip:ViT-B-16 hf:ViTModel ...]
        [--batch 8] [--threads 2] [--rounds 5] [--clock wall|cpu] [--set issue20]

Forward and decomposition alternate on the same batch, so a shared machine's drift hits both alike; the
ratio is the median over rounds of (decomposition time / forward time), the spread its range over rounds.
``--clock cpu`` times the process's CPU time instead of wall time: on a machine shared with other jobs
(run with ``--threads 1``) it counts the work done, not the time spent waiting for a core.
Random-init weights. ``hf:CLASS`` is a transformers vision tower at ViT-B/16 size and 224 px
(:data:`HF_BASE`); ``--models hf`` runs all of them. A timm name may carry ``timm.create_model``
arguments: ``aimv2_large_patch14_224[embed_dim=768,depth=12,num_heads=12]``. ``--set issue20``: base-size
configs of the families added by issue 20 at 224 px (open_clip's timm towers and CoCa, an RmsNorm ViT,
NaFlexVit on an image batch, Swin V2-CR with its stage norms).
"""

from __future__ import annotations

import argparse
import ast
import os
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
ISSUE20_MODELS = [
    "open_clip:ViT-B-16-SigLIP",
    "open_clip:EVA02-B-16",
    "open_clip:coca_ViT-B-32",
    "aimv2_large_patch14_224[embed_dim=768,depth=12,num_heads=12]",
    "naflexvit_base_patch16_gap[img_size=224]",
    "swinv2_cr_base_ns_224",
]
SETS = {"default": DEFAULT_MODELS, "issue20": ISSUE20_MODELS}


def timm_spec(name: str) -> tuple[str, dict]:
    """``"name[k=v,...]"`` -> ``("name", {k: v})`` (values read as Python literals)."""
    if not name.endswith("]"):
        return name, {}
    base, _, args = name[:-1].partition("[")
    pairs = (item.split("=", 1) for item in args.split(",") if item)
    return base, {k.strip(): ast.literal_eval(v.strip()) for k, v in pairs}


#: ViT-B/16 at 224 px, the size of every transformers tower measured (``hf:CLASS``).
VIT_B16 = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "image_size": 224, "patch_size": 16}
#: transformers tower class -> (its config class, extra config).
HF_BASE = {
    "ViTModel": ("ViTConfig", {"intermediate_size": 3072}),
    "DeiTModel": ("DeiTConfig", {"intermediate_size": 3072}),
    "Dinov2Model": ("Dinov2Config", {}),
    "Dinov2WithRegistersModel": ("Dinov2WithRegistersConfig", {"num_register_tokens": 4}),
    "DINOv3ViTModel": ("DINOv3ViTConfig", {"intermediate_size": 3072, "num_register_tokens": 4}),
    "CLIPVisionModel": ("CLIPVisionConfig", {"intermediate_size": 3072}),
    "CLIPVisionModelWithProjection": ("CLIPVisionConfig", {"intermediate_size": 3072, "projection_dim": 512}),
    "SiglipVisionModel": ("SiglipVisionConfig", {"intermediate_size": 3072}),
}


def build_hf(cls: str):
    import transformers

    config_cls, extra = HF_BASE[cls]
    model = getattr(transformers, cls)(getattr(transformers, config_cls)(**VIT_B16, **extra)).eval()
    return model, model, (224, 224)


def build(name: str):
    """``(model, decomposable target, image size)`` for a timm name, ``open_clip:ARCH`` or ``hf:CLASS``."""
    if name.startswith("hf:"):
        return build_hf(name[3:])
    if name.startswith("open_clip:"):
        import open_clip

        model = open_clip.create_model(name.split(":", 1)[1], pretrained=None).eval()
        size = model.visual.image_size
        return model.visual, model, size if isinstance(size, tuple) else (size, size)
    import timm

    base, kwargs = timm_spec(name)
    model = timm.create_model(base, pretrained=False, **kwargs).eval()
    size = kwargs.get("img_size", model.pretrained_cfg["input_size"][1:])
    return model, model, tuple(size) if isinstance(size, (tuple, list)) else (size, size)


def measure(name: str, batch: int, rounds: int, clock=time.perf_counter) -> tuple[float, float, list[float]]:
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
        t0 = clock()
        forward()
        t1 = clock()
        heads()
        t2 = clock()
        fwd.append(t1 - t0)
        dec.append(t2 - t1)
        ratios.append((t2 - t1) / (t1 - t0))
    return statistics.median(fwd), statistics.median(dec), ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=None)
    ap.add_argument("--set", choices=sorted(SETS), default="default", help="the models when --models is not given")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="wall time, or the process's CPU time")
    args = ap.parse_args()
    import torch

    names = args.models or SETS[args.set]
    models = [m for name in names for m in ([f"hf:{c}" for c in HF_BASE] if name == "hf" else [name])]
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"batch {args.batch}, {args.threads} threads, {args.clock} clock, median of {args.rounds} alternating rounds")
    print("| model | forward s | heads s | heads / forward | spread (min–max) | load avg |")
    print("|---|---|---|---|---|---|")
    for name in models:
        f, d, ratios = measure(name, args.batch, args.rounds, clock)
        spread = f"{min(ratios):.2f}–{max(ratios):.2f}"
        load = os.getloadavg()[0]
        print(f"| {name} | {f:.3f} | {d:.3f} | {statistics.median(ratios):.2f}x | {spread} | {load:.1f} |", flush=True)


if __name__ == "__main__":
    main()
