"""Architectures of the zoo: small configs of the real libraries' own model classes.

* ``deit``, ``simclr``, ``planted``: ``timm.models.vision_transformer.VisionTransformer`` (class token,
  standard ``Block``/``Attention``) whose patch embedding is timm's ``HybridEmbed`` over timm's ``ConvStem``
  (as in timm's ``vit_*_mci`` models); the stem is part of the decomposition's "init".
* ``swin``: ``timm SwinTransformer`` (v1 blocks), window 4 (shifted) on an 8 × 8 grid, then one
  patch merging to 4 × 4; the patch embedding is timm's ``HybridEmbed`` over a ``ConvStem`` of stride 8.
* ``maxvit``: ``timm MaxxVit`` with rw-style MaxViT blocks (MBConv + block + grid attention).
* ``clip``: ``open_clip.model.CLIP`` with an open_clip ``VisionTransformer`` image tower whose
  patchify convolution ``visual.conv1`` is replaced by a timm ``ConvStem`` of the same stride (8)
  and output width, and open_clip's own BPE tokenizer.
"""

from __future__ import annotations

import copy
import math
from functools import partial
from typing import TYPE_CHECKING, Any

from vitdecomp.world.attributes import ATTRIBUTES, CORE_ATTRIBUTES

if TYPE_CHECKING:  # torch is imported where a model is built, so ``vitdecomp zoo --help`` does not
    from torch import nn

IMAGE_SIZE = 64
#: Logits of the multi-attribute task: one block per core attribute, in this order.
HEAD_SIZES = {k: len(ATTRIBUTES[k]) for k in CORE_ATTRIBUTES}
NUM_LOGITS = sum(HEAD_SIZES.values())
TIMM_MEAN = (0.5, 0.5, 0.5)
TIMM_STD = (0.5, 0.5, 0.5)

_VIT = {
    "family": "timm.VisionTransformer",
    "img_size": IMAGE_SIZE,
    "embed_dim": 96,
    "depth": 5,
    "num_heads": 4,
    "mlp_ratio": 3.0,
    "class_token": True,
    "global_pool": "token",
    "stem": {"channels": [24, 48, 96, 96], "stride": [2, 2, 2, 1], "kernel_size": [3, 3, 3, 3]},
}

ZOO_CONFIGS: dict[str, dict[str, Any]] = {
    "deit": {**_VIT, "num_classes": NUM_LOGITS},
    "simclr": {**_VIT, "num_classes": 0},
    "planted": {**_VIT, "num_classes": NUM_LOGITS},
    "swin": {
        "family": "timm.SwinTransformer",
        "img_size": IMAGE_SIZE,
        "patch_size": 8,
        "stem": {"channels": [24, 48, 96, 96], "stride": [2, 2, 2, 1], "kernel_size": [3, 3, 3, 3]},
        "window_size": 4,
        "embed_dim": 96,
        "depths": [2, 2],
        "num_heads": [3, 6],
        "drop_path_rate": 0.0,
        "num_classes": NUM_LOGITS,
    },
    "maxvit": {
        "family": "timm.MaxxVit",
        "base": "maxvit_pico_rw_256",
        "img_size": IMAGE_SIZE,
        "embed_dim": [32, 64, 128],
        "depths": [1, 1, 1],
        "block_type": ["M", "M", "M"],
        "stem_width": [16, 32],
        "transformer_window_size": [4, 4],
        "num_classes": NUM_LOGITS,
    },
    "clip": {
        "family": "open_clip.CLIP",
        "embed_dim": 128,
        "vision_cfg": {
            "image_size": IMAGE_SIZE,
            "patch_size": 8,
            "width": 128,
            "layers": 5,
            "head_width": 32,
        },
        "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
        "image_stem": {"channels": [24, 48, 96, 128], "stride": [2, 2, 2, 1], "kernel_size": [3, 3, 3, 3]},
    },
}
ZOO_NAMES = tuple(ZOO_CONFIGS)


def build_model(name: str, config: dict[str, Any] | None = None) -> nn.Module:
    """A freshly initialised zoo model (seed torch yourself for reproducible init)."""
    if config is None:
        if name not in ZOO_CONFIGS:
            raise ValueError(f"unknown zoo model {name!r}; one of {list(ZOO_CONFIGS)}")
        config = ZOO_CONFIGS[name]
    cfg = copy.deepcopy(config)
    family = cfg.pop("family")
    if family == "timm.VisionTransformer":
        from timm.layers import HybridEmbed
        from timm.models.vision_transformer import VisionTransformer

        backbone = conv_stem(cfg.pop("stem"))
        model = VisionTransformer(
            embed_layer=partial(HybridEmbed, backbone=backbone),
            patch_size=1,
            **cfg,
        )
        model.pretrained_cfg = _timm_pretrained_cfg(model, name)
        return model
    if family in ("timm.SwinTransformer", "timm.MaxxVit"):
        import timm

        base = cfg.pop("base", "swin_tiny_patch4_window7_224")
        if "stem" in cfg:
            cfg["embed_layer"] = partial(_swin_hybrid_embed, backbone=conv_stem(cfg.pop("stem")))
            cfg["patch_size"] = 1
        for k, v in list(cfg.items()):
            if isinstance(v, list):
                cfg[k] = tuple(v)
        model = timm.create_model(base, pretrained=False, **cfg)
        model.pretrained_cfg = _timm_pretrained_cfg(model, name)
        return model
    if family == "open_clip.CLIP":
        from open_clip.model import CLIP

        model = CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"])
        if "image_stem" in cfg:
            stem_cfg, vision = cfg["image_stem"], cfg["vision_cfg"]
            if math.prod(stem_cfg["stride"]) != vision["patch_size"] or stem_cfg["channels"][-1] != vision["width"]:
                raise ValueError("image_stem must have the patch size as stride and the width as last channels")
            model.visual.conv1 = conv_stem(stem_cfg)
        return model
    raise ValueError(f"unknown model family {family!r}")


def clip_tokenizer(context_length: int):
    """open_clip's own BPE tokenizer with the zoo CLIP's context length."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


def conv_stem(stem: dict[str, Any]) -> nn.Module:
    """timm's ``ConvStem`` (conv-BN-GELU layers, last conv plain with bias): [B,3,H,W] -> [B,C,H/s,W/s]."""
    from timm.models.vision_transformer_hybrid import ConvStem
    from torch import nn

    return ConvStem(
        depth=len(stem["channels"]),
        channels=tuple(stem["channels"]),
        stride=tuple(stem["stride"]),
        kernel_size=tuple(stem["kernel_size"]),
        act_layer=nn.GELU,
    )


def _swin_hybrid_embed(backbone: nn.Module, norm_layer: Any = None, **kwargs: Any) -> nn.Module:
    """timm's ``HybridEmbed`` as a Swin ``embed_layer``. Swin passes the ``norm_layer`` of its patch
    norm, which ``HybridEmbed`` does not take: the stem's output goes to the first block un-normed."""
    from timm.layers import HybridEmbed

    return HybridEmbed(backbone=backbone, **kwargs)


def _timm_pretrained_cfg(model: nn.Module, name: str) -> dict[str, Any]:
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    cfg.update(
        {
            "architecture": f"zoo_{name}",
            "tag": "vitdecomp-zoo",
            "input_size": (3, IMAGE_SIZE, IMAGE_SIZE),
            "crop_pct": 1.0,
            "crop_mode": "center",
            "interpolation": "bicubic",
            "mean": TIMM_MEAN,
            "std": TIMM_STD,
            "num_classes": getattr(model, "num_classes", 0),
            "url": "",
            "hf_hub_id": None,
        }
    )
    return cfg


def representation(model: nn.Module, name: str, x):
    """The image representation the decomposition reads: pre-logits features of the timm models
    (CLS token after the final norm for the ViTs, pooled features for Swin / MaxViT) and
    ``encode_image`` (after ``proj``) for CLIP."""
    if name == "clip" or hasattr(model, "encode_image"):
        return model.encode_image(x)
    return model.forward_head(model.forward_features(x), pre_logits=True)
