"""Small random-init models of every supported family (the real timm / open_clip classes).

Norm gains/biases and layer scales are perturbed so that no rule can pass by their being 1 or 0.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from unittest import mock

import open_clip
import timm
import torch
from torch import nn


def perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(key in name for key in ("norm", "ln_", "gamma")):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def _timm(name: str, size: int, **kw) -> Callable[[], tuple[nn.Module, int]]:
    def make() -> tuple[nn.Module, int]:
        torch.manual_seed(0)
        return perturb(timm.create_model(name, pretrained=False, **kw)), size

    return make


def _clip(size: int = 32, **vision) -> Callable[[], tuple[nn.Module, int]]:
    def make() -> tuple[nn.Module, int]:
        torch.manual_seed(0)
        vision_cfg = {"image_size": size, "layers": 3, "width": 64, "patch_size": 8, "head_width": 16, **vision}
        text_cfg = {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1}
        return perturb(open_clip.CLIP(embed_dim=24, vision_cfg=vision_cfg, text_cfg=text_cfg)), size

    return make


def _coca(size: int = 32) -> Callable[[], tuple[nn.Module, int]]:
    """open_clip's CoCa: the vision tower's AttentionalPooler (5 queries, 4 heads) gives the embedding."""

    def make() -> tuple[nn.Module, int]:
        torch.manual_seed(0)
        vision = {"image_size": size, "layers": 3, "width": 64, "patch_size": 8, "head_width": 16}
        vision |= {"attentional_pool": True, "attn_pooler_heads": 4, "attn_pooler_queries": 5, "output_tokens": True}
        text = {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1}
        text |= {"embed_cls": True, "output_tokens": True}
        multimodal = {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1}
        return perturb(open_clip.CoCa(24, multimodal | {"attn_pooler_heads": 2}, text, vision)), size

    return make


def _clip_timm(name: str, size: int, pool: str, proj: str | None, **trunk) -> Callable[[], tuple[nn.Module, int]]:
    """An open_clip CLIP whose image tower is open_clip's own ``TimmModel`` wrapping the timm model
    ``name``, built by open_clip's code with ``trunk`` (sizes) added to its ``timm.create_model`` call."""

    def make() -> tuple[nn.Module, int]:
        create = timm.create_model
        torch.manual_seed(0)
        vision = {"image_size": size, "timm_model_name": name, "timm_pool": pool, "timm_proj": proj}
        text = {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1}
        with mock.patch.object(open_clip.timm_model.timm, "create_model", lambda n, **kw: create(n, **kw, **trunk)):
            model = open_clip.CustomTextCLIP(24, vision | {"timm_proj_bias": proj == "linear"}, text)
        return perturb(model), size

    return make


def _zoo(name: str, **changes) -> Callable[[], tuple[nn.Module, int]]:
    """A zoo architecture (convolutional stem in front of the transformer), shrunk."""

    def make() -> tuple[nn.Module, int]:
        from vitdecomp.zoo.models import ZOO_CONFIGS, build_model

        cfg = copy.deepcopy(ZOO_CONFIGS[name])
        for key, value in changes.items():
            if isinstance(value, dict):
                cfg[key].update(value)
            else:
                cfg[key] = value
        torch.manual_seed(0)
        return perturb(build_model(name, cfg)), 64

    return make


def _hf(config_cls: str, model_cls: str, size: int = 32, **config) -> Callable[[], tuple[nn.Module, int]]:
    """A transformers vision tower from a small config (random init); every vector parameter (norm
    gains and biases, projection biases, layer scales, class / register tokens) is perturbed, since
    transformers initialises them to 1 or 0."""

    def make() -> tuple[nn.Module, int]:
        import transformers

        torch.manual_seed(0)
        base = {"hidden_size": 48, "num_hidden_layers": 3, "num_attention_heads": 3, "image_size": size}
        cfg = getattr(transformers, config_cls)(**{**base, "patch_size": 8, **config})
        model = getattr(transformers, model_cls)(cfg)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 1 or p.shape[:-1].numel() <= 4:
                    p.add_(0.3 * torch.randn(p.shape, generator=g))
        return model.eval(), size

    return make


def _map_pool_variant() -> Callable[[], tuple[nn.Module, int]]:
    """A class-token ViT whose MAP head has a position embedding, two averaged latents and q/k norms."""

    def make() -> tuple[nn.Module, int]:
        from timm.layers import AttentionPoolLatent

        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, global_pool="map", **P8, **VIT)
        model.attn_pool = AttentionPoolLatent(
            48, num_heads=3, feat_size=16, pos_embed="abs", latent_len=2, pool_type="avg", qk_norm=True
        )
        with torch.no_grad():
            model.attn_pool.pos_embed.normal_()
            model.attn_pool.latent.normal_()
        return perturb(model), 32

    return make


VIT_BODY = {"depth": 3, "embed_dim": 48, "num_heads": 3}
VIT = {**VIT_BODY, "num_classes": 7}
P8 = {"img_size": 32, "patch_size": 8}
MAXVIT = {
    "img_size": 64,
    "embed_dim": (16, 16, 32, 32),
    "depths": (1, 2, 1, 1),
    "transformer_dim_head": 8,
    "num_classes": 5,
}
#: NaFlexVit with EVA blocks (axial rotary embeddings, SwiGLU), a class token the MAP head also sees
NAFLEX_EVA_BLOCKS = {"rope_type": "axial", "swiglu_mlp": True, "class_token": True, "pool_include_prefix": True}
SWIN = {"patch_size": 2, "window_size": 4, "embed_dim": 16, "depths": (2, 2, 2), "num_heads": (2, 2, 4)}

#: name -> factory returning (model, image size); the families every test runs over.
SMALL_MODELS: dict[str, Callable[[], tuple[nn.Module, int]]] = {
    "vit-cls": _timm("vit_tiny_patch16_224", 32, **P8, **VIT),
    "vit-avg-fcnorm": _timm("vit_tiny_patch16_224", 32, **P8, global_pool="avg", fc_norm=True, **VIT),
    "vit-avg-norm": _timm("vit_tiny_patch16_224", 32, **P8, global_pool="avg", fc_norm=False, **VIT),
    "vit-noclass": _timm("vit_tiny_patch16_224", 32, **P8, class_token=False, global_pool="avg", **VIT),
    "dinov2-reg-ls": _timm("vit_small_patch14_reg4_dinov2", 42, img_size=42, **VIT),
    "deit3-ls": _timm("deit3_small_patch16_224", 32, **P8, **VIT),
    "timm-clip-vit": _timm("vit_base_patch16_clip_224", 32, **P8, **VIT),
    "openclip-tok": _clip(),
    "openclip-avg-ls": _clip(pool_type="avg", ls_init_value=0.5),
    "openclip-ln-after-pool": _clip(final_ln_after_pool=True),
    "swin": _timm("swin_tiny_patch4_window7_224", 64, img_size=64, num_classes=5, **SWIN),
    "swin-padded": _timm("swin_tiny_patch4_window7_224", 56, img_size=56, num_classes=5, **SWIN),
    "maxvit-tf": _timm("maxvit_tiny_tf_224", 64, **MAXVIT, stem_width=16, head_hidden_size=32),
    "zoo-vit-convstem": _zoo("deit", depth=2, embed_dim=32, num_heads=2, stem={"channels": [8, 16, 32, 32]}),
    "zoo-swin-convstem": _zoo("swin", embed_dim=16, depths=[2, 1], num_heads=[1, 2]),
    "zoo-clip-convstem": _zoo(
        "clip",
        embed_dim=16,
        vision_cfg={"layers": 2, "width": 32, "head_width": 16},
        text_cfg={"layers": 1, "width": 32},
        image_stem={"channels": [8, 8, 16, 32]},
    ),
    "maxvit-rw": _timm("maxvit_rmlp_pico_rw_256", 64, **MAXVIT, stem_width=(8, 16), transformer_init_values=0.5),
    "maxvit-rw-nchw": _timm(
        "maxvit_rmlp_pico_rw_256", 64, **MAXVIT, stem_width=(8, 16), transformer_use_nchw_attn=True
    ),
    "siglip-map": _timm("vit_base_patch16_siglip_224", 32, **P8, **VIT, global_pool="map"),
    "map-pool-pos-latents-qknorm": _map_pool_variant(),
    "deit-distilled": _timm("deit_tiny_distilled_patch16_224", 32, **P8, **VIT),
    "swinv2": _timm("swinv2_tiny_window8_256", 64, img_size=64, num_classes=5, **SWIN),
    "eva02-swiglu-rope": _timm("eva02_tiny_patch14_224", 42, img_size=42, **VIT),
    "eva02-clip-innernorm-ls": _timm("eva02_base_patch16_clip_224", 32, **P8, init_values=0.5, **VIT),
    "eva-postnorm": _timm("eva02_enormous_patch14_clip_224", 42, img_size=42, scale_attn_inner=True, **VIT),
    "eva-pe-map-rope": _timm("vit_pe_core_tiny_patch16_384", 32, **P8, attn_pool_num_heads=4, **VIT),
    "beit-relpos-ls": _timm("beit_base_patch16_224", 32, **P8, **VIT),
    "beitv2-token-sharedrel": _timm(
        "beitv2_base_patch16_224",
        32,
        **P8,
        global_pool="token",
        use_rel_pos_bias=False,
        use_shared_rel_pos_bias=True,
        **VIT,
    ),
    "swinv2-padded": _timm("swinv2_tiny_window8_256", 56, img_size=56, num_classes=5, **SWIN),
    "aimv2-rmsnorm-swiglu": _timm("aimv2_large_patch14_224", 42, img_size=42, **VIT),
    "sapiens2-eva-rmsnorm-gqa": _timm("vit_base_patch16_sapiens2", 32, **P8, **VIT, num_kv_heads=(3, 1, 3)),
    "coca-attentional-pooler": _coca(),
    "openclip-timm-siglip-map": _clip_timm("vit_base_patch16_siglip_224", 32, "map", "none", **P8, **VIT_BODY),
    "openclip-timm-eva02-head-proj": _clip_timm("eva02_base_patch16_clip_224", 32, "token", None, **P8, **VIT_BODY),
    "openclip-timm-vit-linear-proj": _clip_timm("vit_medium_patch16_gap_256", 32, "", "linear", **P8, **VIT_BODY),
    "naflex-gap-reg": _timm("naflexvit_base_patch16_gap", 32, **P8, **VIT),
    "naflex-map-rope-swiglu": _timm("naflexvit_base_patch16_map", 32, **P8, **VIT, **NAFLEX_EVA_BLOCKS),
    "swinv2-cr-stage-norms": _timm("swinv2_cr_tiny_ns_224", 64, img_size=64, num_classes=5, **SWIN),
    "swinv2-cr-block-norms-padded": _timm(
        "swinv2_cr_tiny_ns_224", 56, img_size=56, num_classes=5, extra_norm_period=1, **SWIN
    ),
    "hf-vit": _hf("ViTConfig", "ViTModel", intermediate_size=96),
    "hf-deit-eager": _hf("DeiTConfig", "DeiTModel", intermediate_size=96, attn_implementation="eager"),
    "hf-dinov2-swiglu": _hf("Dinov2Config", "Dinov2Model", use_swiglu_ffn=True, layerscale_value=0.5),
    "hf-dinov2-registers": _hf("Dinov2WithRegistersConfig", "Dinov2WithRegistersModel", num_register_tokens=2),
    "hf-dinov3-rope-gated": _hf(
        "DINOv3ViTConfig", "DINOv3ViTModel", intermediate_size=96, num_register_tokens=2, use_gated_mlp=True
    ),
    "hf-clip": _hf("CLIPVisionConfig", "CLIPVisionModel", intermediate_size=96),
    "hf-clip-projection": _hf(
        "CLIPVisionConfig", "CLIPVisionModelWithProjection", intermediate_size=96, projection_dim=24
    ),
    "hf-siglip-map": _hf("SiglipVisionConfig", "SiglipVisionModel", intermediate_size=96),
}


def representations(model: nn.Module) -> list[str | None]:
    """Every representation a test model offers (None = the default)."""
    if type(model).__module__.startswith("transformers."):
        from vitdecomp.models.registry import adapter_for

        return [None, *adapter_for(model)[0].representations_of(model)[1:]]
    if hasattr(model, "encode_image"):
        return [None]
    if isinstance(model, timm.models.deit.VisionTransformerDistilled):
        return [None, "cls", "dist"]
    if isinstance(model, timm.models.maxxvit.MaxxVit):
        return [None, "pooled_norm"] if hasattr(model.head, "pre_logits") else [None, "logits"]
    return [None, "logits"]


def own_output(model: nn.Module, x: torch.Tensor, rep: str | None) -> torch.Tensor:
    """The model's own output for a representation, computed through its own forward methods."""
    with torch.no_grad():
        if type(model).__module__.startswith("transformers."):
            return hf_output(model, model(x), x, rep)
        if hasattr(model, "encode_image"):
            return model.encode_image(x, normalize=False)
        if rep == "logits":
            return model(x)
        feats = model.forward_features(x)
        if rep in ("cls", "dist"):
            return feats[:, 0 if rep == "cls" else 1]
        if isinstance(model, timm.models.maxxvit.MaxxVit):
            pooled = model.head.global_pool(feats)
            return (model.head.norm(pooled) if rep == "pooled_norm" else pooled).flatten(1)
        return model.forward_head(feats, pre_logits=True)


#: The documented default representation of each transformers tower (README's family table).
HF_DEFAULTS = {
    "ViTModel": "last_hidden_state[:, 0]",
    "DeiTModel": "last_hidden_state[:, 0]",
    "CLIPVisionModelWithProjection": "image_embeds",
}


def hf_output(model: nn.Module, out, x: torch.Tensor, rep: str | None) -> torch.Tensor:
    """A transformers tower's own output for a representation name, read off its output object."""
    hidden, patch = out.last_hidden_state, model.config.patch_size
    prefix = hidden.shape[1] - (x.shape[2] // patch) * (x.shape[3] // patch)
    rep = rep or HF_DEFAULTS.get(type(model).__name__, "pooler_output")
    return {
        "image_embeds": lambda: out.image_embeds,
        "pooler_output": lambda: out.pooler_output,
        "vision_model.pooler_output": lambda: model.vision_model(x).pooler_output,
        "last_hidden_state[:, 0]": lambda: hidden[:, 0],
        "last_hidden_state[:, 1]": lambda: hidden[:, 1],
        "last_hidden_state[:, :2].mean(1)": lambda: hidden[:, :2].mean(1),
        "patch_mean": lambda: hidden[:, prefix:].mean(1),
    }[rep]()
