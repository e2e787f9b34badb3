"""Acceptance tests of the decomposition: the invariants, on every supported family."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
from timm.models.vision_transformer import ResPostBlock

import vitdecomp as vd
from small_models import P8, SMALL_MODELS, VIT, own_output, perturb, representations
from vitdecomp.decomp.capture import to_stream
from vitdecomp.errors import UnsupportedModuleError, VitDecompError

NAMES = list(SMALL_MODELS)


@pytest.fixture(scope="module", params=NAMES)
def built(request):
    model, size = SMALL_MODELS[request.param]()
    return request.param, model, size


@pytest.fixture
def small(built):
    """A fresh copy of the model for each test, so no test leaves a shared model converted."""
    name, model, size = built
    return name, copy.deepcopy(model), size


def images(size: int, n: int = 3, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_parts_sum_to_the_models_own_output(small, dtype, tol):
    name, model, size = small
    model = model.to(dtype)
    x = images(size, dtype=dtype)
    for rep in representations(model):
        d = vd.decompose(model, x, representation=rep, check=0)
        assert d.contributions.dtype == dtype
        assert d.error.max().item() <= tol, (name, rep, d.error)
        # the representation is the model's own output, not something the engine recomputed
        torch.testing.assert_close(d.representation, own_output(model, x, rep), rtol=1e-5, atol=1e-6)


def test_labels_are_unique_and_complete(small):
    _, model, size = small
    d = vd.decompose(model, images(size))
    assert len(set(d.names)) == len(d.names)
    assert d.names[0] == "init"
    heads = [lab for lab in d.labels if lab.kind == "attn_head"]
    layers = sorted({lab.layer for lab in heads})
    assert layers == list(range(len(layers))), "every block appears, numbered from 0"
    assert {lab.kind for lab in d.labels} >= {"init", "attn_head", "mlp"}


def test_token_contributions_sum_to_heads(small):
    name, model, size = small
    model = model.double()
    if name.endswith("-padded"):
        with pytest.raises(VitDecompError, match="padded windows"):
            vd.decompose(model, images(size, dtype=torch.float64), tokens=True)
        return
    d = vd.decompose(model, images(size, dtype=torch.float64), tokens=True)
    assert d.tokens, "tokens were asked for"
    n_heads = 0
    for stack in d.tokens:
        idx = d.index([lab.name for lab in stack.labels])
        torch.testing.assert_close(stack.values.sum(2), d.contributions[:, idx], rtol=0, atol=1e-12)
        gh, gw = stack.grid_size
        assert stack.values.shape[2] == stack.num_prefix_tokens + gh * gw
        assert stack.pixel_boxes.shape == (stack.values.shape[2], 4)
        real = stack.pixel_boxes[stack.num_prefix_tokens :]
        assert real[:, 2].max() == size and real[:, 3].max() == size, "token boxes tile the input image"
        n_heads += len(stack.labels)
    assert n_heads == sum(lab.kind == "attn_head" for lab in d.labels)


def test_result_does_not_depend_on_the_rest_of_the_batch(small):
    _, model, size = small
    model = model.double()
    x = images(size, n=4, dtype=torch.float64)
    whole = vd.decompose(model, x)
    alone = vd.decompose(model, x[2:3])
    torch.testing.assert_close(whole.contributions[2:3], alone.contributions, rtol=0, atol=1e-12)


def test_start_layer_folds_earlier_blocks_into_init(small):
    _, model, size = small
    model = model.double()
    x = images(size, dtype=torch.float64)
    full = vd.decompose(model, x)
    k = 2
    folded = vd.decompose(model, x, start_layer=k)
    early = [i for i, lab in enumerate(full.labels) if lab.kind == "init" or (lab.layer is not None and lab.layer < k)]
    early_sum = full.contributions[:, early].sum(1)
    # transition constants of stages before the cut are folded too
    folded_away = [lab.name for lab in full.labels if lab.kind == "transition_bias" and lab.name not in folded.names]
    if folded_away:
        early_sum = early_sum + full.sum(folded_away)
    torch.testing.assert_close(folded.sum("init"), early_sum, rtol=0, atol=1e-10)
    for name_ in folded.names[1:]:
        torch.testing.assert_close(folded.sum(name_), full.sum(name_), rtol=0, atol=1e-10)
    everything = vd.decompose(model, x, start_layer=full.meta["num_blocks"])
    assert [lab.kind for lab in everything.labels if lab.kind in ("attn_head", "mlp")] == []
    assert everything.error.max() < 1e-10


def test_heads_false_gives_one_component_per_attention_layer(small):
    _, model, size = small
    x = images(size, dtype=torch.float64)
    model = model.double()
    by_head = vd.decompose(model, x)
    by_layer = vd.decompose(model, x, heads=False)
    for lab in by_layer.labels:
        if lab.kind == "attn":
            parts = by_head.index(
                lambda h, lab=lab: (
                    h.kind in ("attn_head", "attn_bias") and (h.layer, h.sublayer) == (lab.layer, lab.sublayer)
                )
            )
            torch.testing.assert_close(
                by_layer.sum(lab.name), by_head.contributions[:, parts].sum(1), rtol=0, atol=1e-12
            )
    assert by_layer.error.max() < 1e-10


def test_one_layers_heads_equal_a_hand_computation():
    """DeiT-style class-token readout: head h of layer 1, from the layer's weights by hand."""
    model, size = SMALL_MODELS["vit-cls"]()
    model = model.double()
    x = images(size, n=2, dtype=torch.float64)
    seen = {}
    blk = model.blocks[1]
    h1 = blk.norm1.register_forward_hook(lambda m, a, out: seen.__setitem__("a", out))
    h2 = model.norm.register_forward_pre_hook(lambda m, a: seen.__setitem__("final", a[0]))
    with torch.no_grad():
        model(x)
    h1.remove()
    h2.remove()
    a = seen["a"]  # [B, N, D] the attention's input
    heads, d = blk.attn.num_heads, a.shape[-1]
    dh = d // heads
    qkv = a @ blk.attn.qkv.weight.T + blk.attn.qkv.bias
    q, k, v = qkv.view(a.shape[0], a.shape[1], 3, heads, dh).permute(2, 0, 3, 1, 4)
    probs = ((q @ k.transpose(-1, -2)) / math.sqrt(dh)).softmax(-1)  # [B, H, N, N]
    z = torch.einsum("bhn,bhnd->bhd", probs[:, :, 0], v)  # class-token query
    w_o = blk.attn.proj.weight.view(d, heads, dh)
    final = seen["final"][:, 0]  # the class token entering the final norm
    sigma = torch.sqrt(final.var(-1, unbiased=False) + model.norm.eps)
    dec = vd.decompose(model, x)
    for h in range(heads):
        c = torch.einsum("dk,bk->bd", w_o[:, h], z[:, h])
        expected = model.norm.weight * (c - c.mean(-1, keepdim=True)) / sigma[:, None]
        torch.testing.assert_close(dec.sum(f"L1.H{h}"), expected, rtol=0, atol=1e-12)
    bias = blk.attn.proj.bias
    expected_bias = model.norm.weight * (bias - bias.mean()) / sigma[:, None]
    torch.testing.assert_close(dec.sum("L1.attn_bias"), expected_bias, rtol=0, atol=1e-12)
    torch.testing.assert_close(dec.sum("norm_bias"), model.norm.bias.expand(2, -1), rtol=0, atol=0)


def test_rms_norm_scales_each_component_without_centring():
    """AIMv2's final RmsNorm, frozen: a part reaches the (average-pooled) representation as
    ``mean_t gamma * part_t / rms(stream_t)`` — no centring, and no beta component (the norm has none)."""
    model, size = SMALL_MODELS["aimv2-rmsnorm-swiglu"]()
    model = model.double()
    x = images(size, n=2, dtype=torch.float64)
    seen = {}
    hooks = [
        model.blocks[2].mlp.register_forward_hook(lambda m, a, out: seen.__setitem__("mlp", out)),
        model.norm.register_forward_pre_hook(lambda m, a: seen.__setitem__("final", a[0])),
    ]
    d = vd.decompose(model, x)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        rms = seen["final"].pow(2).mean(-1, keepdim=True).add(model.norm.eps).sqrt()  # [B, N, 1]
        expected = (model.norm.weight * seen["mlp"] / rms).mean(1)
    torch.testing.assert_close(d.sum("L2.mlp"), expected, rtol=0, atol=1e-12)
    assert not any("norm_bias" in name for name in d.names)


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_simple_norm_rule_final_and_fc_norm(pool):
    """timm's SimpleNorm (uncentred x over its unbiased std; only ConvNeXt variants ship it) as a ViT's final
    norm (``token``) or ``fc_norm`` (``avg``): exact with its own statistic."""
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, norm_layer="simplenorm", global_pool=pool, **P8, **VIT
    )
    model = perturb(model).double()
    x = images(32, dtype=torch.float64)
    for rep in (None, "logits"):
        assert vd.decompose(model, x, representation=rep).error.max().item() <= 1e-12


def test_fused_attention_and_train_mode_are_restored_after_a_token_pass():
    model, size = SMALL_MODELS["vit-cls"]()
    model.train()
    before = [blk.attn.fused_attn for blk in model.blocks]
    d = vd.decompose(model, images(size), tokens=True)
    assert d.error.max() < 1e-5, "decomposed in eval mode (no dropout)"
    assert model.training
    assert [blk.attn.fused_attn for blk in model.blocks] == before
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_tokens_for_chosen_layers_only():
    model, size = SMALL_MODELS["vit-cls"]()
    d = vd.decompose(model.double(), images(size, dtype=torch.float64), tokens=[2])
    assert {lab.layer for lab in d.tokens[0].labels} == {2}


def test_unsupported_block_is_named_with_its_path_and_class():
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, block_fn=ResPostBlock
    )
    with pytest.raises(UnsupportedModuleError, match=r"'blocks\.0'.*ResPostBlock"):
        vd.decompose(model.eval(), images(32))


def test_unknown_models_are_refused_by_class():
    convnet = timm.create_model("resnet18", pretrained=False)
    with pytest.raises(UnsupportedModuleError, match="ResNet"):
        vd.decompose(convnet.eval(), images(32))


def test_scale_norm_inside_attention_is_refused():
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, scale_attn_norm=True
    )
    with pytest.raises(UnsupportedModuleError, match=r"blocks\.0\.attn\.norm"):
        vd.decompose(model.eval(), images(32))


def test_a_broken_rule_is_caught_by_the_completeness_check(monkeypatch):
    """If a rule were wrong, the check (on by default) must raise rather than return a wrong answer."""
    from vitdecomp.decomp.branches import HeadsPart

    model, size = SMALL_MODELS["vit-cls"]()
    original = HeadsPart.out_weight

    def broken(self, like):
        return (1.5 if self.path == "blocks.1.attn" else 1.0) * original(self, like)

    monkeypatch.setattr(HeadsPart, "out_weight", broken)
    with pytest.raises(VitDecompError, match=r"do not add up.*block 'blocks\.1' of class Block"):
        vd.decompose(model, images(size))


@pytest.mark.parametrize(
    "name",
    [
        "swin",
        "swinv2",
        "openclip-tok",
        "vit-avg-norm",
        "maxvit-tf",
        "siglip-map",
        "swinv2-cr-block-norms-padded",
        "coca-attentional-pooler",
        "openclip-timm-eva02-head-proj",
        "naflex-map-rope-swiglu",
        "hf-siglip-map",
        "hf-dinov3-rope-gated",
    ],
)
def test_every_block_adds_up_on_its_own(name):
    """The per-block check used to locate failures: R(out) - R(in) equals the block's parts."""
    from vitdecomp.decomp.engine import run_plan
    from vitdecomp.models.registry import adapter_for

    model, size = SMALL_MODELS[name]()
    model = model.double()
    adapter, target = adapter_for(model)
    plan = adapter.plan(target, start_layer=0, representation=None, heads=True)
    streams: dict = {}
    result = run_plan(plan, target, images(size, dtype=torch.float64), True, False, streams)
    residuals = result.meta["block_residuals"]
    assert len(residuals) == result.meta["num_blocks"]
    assert max(residuals.values()) < 1e-12


def _hooks_and_patches(model: torch.nn.Module) -> list:
    """Every hook on any module, and every instance attribute a decomposition may patch."""
    state = []
    for name, m in model.named_modules():
        state.append((name, len(m._forward_hooks), len(m._forward_pre_hooks), "forward" in vars(m)))
        state.append((name, vars(m).get("fused_attn"), m.training))
        state.append((name, getattr(getattr(m, "config", None), "_attn_implementation", None)))
    return state


@pytest.mark.parametrize("name", NAMES)
def test_no_hook_or_patch_survives_a_decomposition_that_raised(name, monkeypatch):
    """captum-style: a decomposition that fails in the pass, or after it, leaves the model as it was."""
    from vitdecomp.decomp import steps

    model, size = SMALL_MODELS[name]()
    model.train()
    before = _hooks_and_patches(model)
    with pytest.raises((RuntimeError, ValueError)):  # the model itself raises inside the pass (wrong channel count)
        vd.decompose(model, torch.randn(2, 5, size, size), tokens=True)
    assert _hooks_and_patches(model) == before

    def fail(self):
        raise RuntimeError("injected failure while reading out")

    monkeypatch.setattr(steps.ReadoutBuilder, "build", fail)
    with pytest.raises(RuntimeError, match="injected"):
        vd.decompose(model, images(size), tokens=True)
    assert _hooks_and_patches(model) == before


def test_every_registered_adapter_has_a_test_row():
    """A registered adapter without a row in the family table fails the suite."""
    from vitdecomp.models.registry import ADAPTERS, target_of

    covered = set()
    for make in SMALL_MODELS.values():
        model, _ = make()
        target = target_of(model)
        covered.add((type(target).__module__, type(target).__qualname__))
    missing = sorted(set(ADAPTERS) - covered)
    assert not missing, f"adapters with no test row in tests/small_models.py: {missing}"


def test_selection_helpers():
    model, size = SMALL_MODELS["vit-cls"]()
    d = vd.decompose(model.double(), images(size, dtype=torch.float64))
    layer2 = d.select(lambda lab: lab.layer == 2)
    assert all(lab.layer == 2 for lab in layer2.labels)
    torch.testing.assert_close(layer2.contributions.sum(1), d.sum(lambda lab: lab.layer == 2))
    grouped, keys = d.by_layer()
    torch.testing.assert_close(grouped.sum(1), d.contributions.sum(1))
    assert len(keys) == len(set(keys))
    with pytest.raises(KeyError):
        d.index("L99.H0")
    assert "completeness" in d.summary()


@pytest.mark.slow
def test_base_size_deit_float32():
    model = timm.create_model("deit_base_patch16_224", pretrained=False).eval()
    d = vd.decompose(model, images(224, n=2), tokens=[11])
    assert d.contributions.shape == (2, 1 + 12 * 14 + 1, 768)
    assert d.error.max().item() <= 1e-5
    idx = d.index([lab.name for lab in d.tokens[0].labels])
    torch.testing.assert_close(d.tokens[0].values.sum(2), d.contributions[:, idx], rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_runs_on_cuda():
    model, size = SMALL_MODELS["swin"]()
    d = vd.decompose(model.cuda(), images(size).cuda(), tokens=True)
    assert d.contributions.is_cuda and d.error.max() < 1e-4


@pytest.mark.parametrize("name", ["swin", "swin-padded", "maxvit-tf", "maxvit-rw", "maxvit-rw-nchw"])
def test_window_slots_map_to_the_right_stream_positions(name):
    """Shifted / block / grid windows: each attention's per-token output, rebuilt from the heads'
    stream-ordered inputs, equals the model's own attention-branch output at every position."""
    from vitdecomp.decomp.branches import HeadsPart
    from vitdecomp.decomp.capture import Capture
    from vitdecomp.decomp.plan import Heads, Tap
    from vitdecomp.models.registry import adapter_for

    model, size = SMALL_MODELS[name]()
    model = model.double()
    adapter, target = adapter_for(model)
    plan = adapter.plan(target, start_layer=0, representation=None, heads=True)
    specs = [br for st in plan.stages for blk in st.blocks for br in blk.branches if isinstance(br, Heads)]
    parts = [HeadsPart(spec, {"layer": 0}, True) for spec in specs]
    assert all(spec.windows is not None for spec in specs)
    cap, own = Capture(), {}

    for i, (spec, part) in enumerate(zip(specs, parts, strict=True)):
        part.attach(cap, None, False)
        layer = spec.windows.grid.module  # holds norm1 (attention input) and norm2 (after the residual)
        cap.tap(
            Tap(layer.norm1, "input", spec.windows.grid.layout),
            _stream_keeper(own, (i, "in"), spec),
        )
        cap.tap(
            Tap(layer.norm2, "input", spec.windows.grid.layout),
            _stream_keeper(own, (i, "mid"), spec),
        )
    with torch.inference_mode():
        model(images(size, dtype=torch.float64))
    cap.close()
    for i, part in enumerate(parts):
        with torch.inference_mode():
            z = part.stream_z()
            w = part.out_weight(z).flatten(1)  # [D, H*dh]
            ls = part.spec.layer_scale
            bias = part.spec.proj_bias * (1 if ls is None else ls)
            rebuilt = z @ w.T + bias
        torch.testing.assert_close(rebuilt, own[(i, "mid")] - own[(i, "in")], rtol=0, atol=1e-12)


def _stream_keeper(own: dict, key, spec):
    return lambda x: own.__setitem__(key, to_stream(x, spec.windows.grid.layout))


def test_norm_statistics_handed_over_or_recomputed_keep_the_output():
    """A plain LayerNorm hands its own statistics to the readout in float32 (Swin V2's post-norms and
    patch mergings, ``Capture.norm_stats``) and they are recomputed from its input in bfloat16: either way
    the model's output is bit for bit its own and the parts add up."""
    from vitdecomp.decomp.engine import COMPLETENESS_TOLERANCE

    model, size = SMALL_MODELS["swinv2"]()
    x = images(size)
    for dtype in (torch.float32, torch.bfloat16):
        m = model.to(dtype)
        with torch.inference_mode():
            own = m.forward_head(m.forward_features(x.to(dtype)), pre_logits=True)
        d = vd.decompose(m, x)
        assert torch.equal(d.representation, own)
        assert d.error.max().item() <= COMPLETENESS_TOLERANCE[dtype]
