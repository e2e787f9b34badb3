"""MaxViT (timm ``MaxxVit`` with ``MaxxVitBlock`` stages): completeness, tokens, batch independence, errors."""

from __future__ import annotations

import pytest
import timm
import torch

import vitdecomp as vd
from vitdecomp.errors import UnsupportedModuleError

SMALL = {"img_size": 64, "embed_dim": (16, 16, 32, 32), "depths": (1, 2, 1, 1), "transformer_dim_head": 8}
TINY = {**SMALL, "depths": (1, 1, 1, 1), "stem_width": (8, 16), "num_classes": 5}

#: name -> (timm model name, kwargs). Small random-init configs of the real classes.
VARIANTS = {
    # TF port: head_first=False qkv, 'same' padding (AvgPool2dSame shortcut), expand conv with bias,
    # NormMlpClassifierHead (LayerNorm2d on the pooled vector, tanh pre-logits), model.norm = Identity
    "tf": ("maxvit_tiny_tf_224", {**SMALL, "stem_width": 16, "head_hidden_size": 32, "num_classes": 5}),
    # timm's own: head_first qkv, MLP relative position bias, layer scale, per-token final LayerNorm2d
    "rw-rmlp-ls": (
        "maxvit_rmlp_pico_rw_256",
        {**SMALL, "stem_width": (8, 16), "transformer_init_values": 0.5, "num_classes": 5},
    ),
    # timm's own with 1x1 expand shortcuts (no bias) and NCHW partition attention (Attention2d)
    "rw-nchw": (
        "maxvit_nano_rw_256",
        {**TINY, "embed_dim": (16, 32, 32, 48), "transformer_use_nchw_attn": True},
    ),
}


def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(key in name for key in ("norm", "gamma", "bias")):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.mul_(0.5 + torch.rand(b.shape, generator=g))
    return model.eval()


def make(name: str, **extra) -> torch.nn.Module:
    timm_name, kw = VARIANTS.get(name, (name, {}))
    torch.manual_seed(0)
    return perturb(timm.create_model(timm_name, pretrained=False, **{**kw, **extra}))


def images(n: int = 2, seed: int = 0, dtype=torch.float64, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(dtype)


def own_output(model, x: torch.Tensor, rep: str) -> torch.Tensor:
    with torch.no_grad():
        feats = model.forward_features(x)
        if rep == "logits":
            return model.forward_head(feats)
        pooled = model.head.global_pool(feats)
        if rep == "pooled_norm":
            pooled = model.head.norm(pooled)
        return pooled.flatten(1)


def reps_of(name: str) -> list[str]:
    return ["pooled", "pooled_norm"] if name.startswith("tf") else ["pooled", "logits"]


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request):
    return request.param, make(request.param)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_parts_sum_to_the_models_own_output(variant, dtype, tol):
    name, model = variant
    model = model.to(dtype)
    x = images(dtype=dtype)
    try:
        for rep in reps_of(name):
            d = vd.decompose(model, x, representation=rep, check=0)
            assert d.contributions.dtype == dtype
            assert d.error.max().item() <= tol, (name, rep, d.error)
            torch.testing.assert_close(d.representation, own_output(model, x, rep), rtol=1e-5, atol=1e-6)
    finally:
        model.double()


def test_components_and_labels(variant):
    name, model = variant
    d = vd.decompose(model, images())
    names = [lab.name for lab in d.labels]
    assert len(set(names)) == len(names)
    n_blocks = sum(len(s.blocks) for s in model.stages)
    assert sum(lab.kind == "conv" for lab in d.labels) == n_blocks
    for sub in ("block", "grid"):
        mlps = [lab for lab in d.labels if lab.kind == "mlp" and lab.sublayer == sub]
        assert len(mlps) == n_blocks
        heads = [lab for lab in d.labels if lab.kind == "attn_head" and lab.sublayer == sub]
        assert len(heads) == sum(blk.attn_grid.attn.num_heads for s in model.stages for blk in s.blocks)
    assert d.labels[0].kind == "init"
    assert d.meta["representation"] == "pooled"
    if name.startswith("tf"):  # biased expand convs in the downsampling shortcuts
        assert any(lab.kind == "transition_bias" for lab in d.labels)


@pytest.mark.parametrize("start", [0, 1, 2, 4])
def test_tokens_sum_to_head_contributions(variant, start):
    _, model = variant
    n_blocks = sum(len(s.blocks) for s in model.stages)
    start = min(start, n_blocks)
    d = vd.decompose(model, images(), tokens=True, start_layer=start)
    assert d.error.max().item() <= 1e-10
    n_heads = 0
    for t in d.tokens:
        idx = d.index([lab.name for lab in t.labels])
        torch.testing.assert_close(t.values.sum(2), d.contributions[:, idx], rtol=0, atol=1e-12)
        assert t.values.shape[2] == t.grid_size[0] * t.grid_size[1] == t.pixel_boxes.shape[0]
        n_heads += len(t.labels)
    assert n_heads == sum(lab.kind == "attn_head" for lab in d.labels)


def test_start_layer_folds_everything(variant):
    _, model = variant
    n_blocks = sum(len(s.blocks) for s in model.stages)
    d = vd.decompose(model, images(), start_layer=n_blocks)
    assert {lab.kind for lab in d.labels} <= {"init", "norm_bias"}
    assert d.error.max().item() <= 1e-10


def test_batch_independence(variant):
    _, model = variant
    x = images(3)
    full = vd.decompose(model, x, tokens=True)
    for i in (0, 2):
        one = vd.decompose(model, x[i : i + 1], tokens=True)
        torch.testing.assert_close(one.contributions[0], full.contributions[i], rtol=1e-9, atol=1e-12)
        for a, b in zip(one.tokens, full.tokens, strict=True):
            torch.testing.assert_close(a.values[0], b.values[i], rtol=1e-9, atol=1e-12)


def test_unsupported_representations():
    tf = make("tf").double()
    with pytest.raises(UnsupportedModuleError, match=r"head\.pre_logits"):
        vd.decompose(tf, images(1), representation="logits")
    rw = make("rw-rmlp-ls").double()
    with pytest.raises(ValueError, match="no norm"):
        vd.decompose(rw, images(1), representation="pooled_norm")
    with pytest.raises(ValueError, match="representation"):
        vd.decompose(rw, images(1), representation="cls")


@pytest.mark.parametrize(
    "timm_name,extra,path,cls",
    [
        ("maxvit_nano_rw_256", {"conv_pool_type": "max2"}, "stages.1.blocks.0.conv.shortcut.pool", "MaxPool2d"),
        ("maxxvit_rmlp_nano_rw_256", {}, "stages.0.blocks.0.conv", "ConvNeXtBlock"),
        ("coatnet_pico_rw_224", {"block_type": ("C", "C", "T", "T")}, "stages.2.blocks.0", "TransformerBlock2d"),
        ("maxvit_tiny_pm_256", {}, "stages.0.blocks.0", "ParallelMaxxVitBlock"),
    ],
)
def test_modules_without_a_rule_raise(timm_name, extra, path, cls):
    torch.manual_seed(0)
    model = timm.create_model(timm_name, pretrained=False, **TINY, **extra).eval().double()
    with pytest.raises(UnsupportedModuleError) as info:
        vd.decompose(model, images(1))
    assert info.value.path == path and info.value.cls.endswith(cls)
    # folded into init, they need no rule
    d = vd.decompose(model, images(1), start_layer=sum(len(s.blocks) for s in model.stages))
    assert d.error.max().item() <= 1e-10


def test_plain_mbconv_blocks_and_pool_stride():
    """CoAtNet-style bare MBConv blocks and 'pool' stride mode (3x3 avg shortcut, biased expand)."""
    kw = {**TINY, "embed_dim": (16, 32, 32, 48), "block_type": ("C", "C", "M", "M")}
    model = make("maxvit_nano_rw_256", **kw, conv_pool_type="avg", conv_stride_mode="pool", conv_output_bias=True)
    model = model.double()
    d = vd.decompose(model, images(), tokens=True)
    assert d.error.max().item() <= 1e-10
    assert [lab.name for lab in d.labels if lab.kind == "conv"][:2] == ["S0.B0.conv", "S1.B0.conv"]
    assert any(lab.kind == "transition_bias" for lab in d.labels)
