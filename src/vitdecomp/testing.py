"""Hold an adapter — vitdecomp's own or a plug-in's — to the standard every shipped adapter is tested to.

In a plug-in package's tests::

    from vitdecomp.testing import check_adapter, unchecked_adapters

    def test_my_adapter():
        report = check_adapter(MyViT(...).eval(), torch.randn(3, 3, 32, 32))  # AssertionError if not
        assert report.heads > 0

    def test_every_plugin_adapter_is_checked():  # run last: the rule vitdecomp's own suite applies
        assert not unchecked_adapters()

:func:`check_adapter` decomposes, for every representation the adapter offers: on the model as given,
the parts sum to the model's own output within :data:`TOLERANCE` (relative, per image: ``1e-5`` in
float32, ``1e-12`` in float64, the engine's default for lower precisions), and again on a float64 copy;
every declared attention has one part per head, each non-zero; a decomposition of one image equals its
row in a batch; token splits sum to their head; and no hook or patch is left on the model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from vitdecomp.api import decompose
from vitdecomp.decomp.engine import COMPLETENESS_TOLERANCE
from vitdecomp.decomp.plan import Heads
from vitdecomp.models.registry import Adapter, adapter_for, plugin_names

#: Relative completeness tolerance per dtype of the representation (others: the engine's default).
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}

_CHECKED: set[str] = set()


@dataclass
class AdapterReport:
    """What :func:`check_adapter` measured. ``error``: ``"<representation> <dtype>"`` -> the largest
    relative completeness error over the images; ``heads``: attention heads with a part of their own;
    ``batch_error`` / ``token_error``: float64, relative to the largest representation entry."""

    family: str
    model_class: str
    representations: list[str | None]
    error: dict[str, float] = field(default_factory=dict)
    heads: int = 0
    batch_error: float = 0.0
    token_error: float | None = None


def _dotted(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def representations_of(adapter: Adapter, model: nn.Module) -> list[str | None]:
    """Every representation an adapter offers for ``model``, the default first (``None``): its
    ``representations_of(model)`` method or its ``representations`` tuple; ``[None]`` without either."""
    if hasattr(adapter, "representations_of"):
        names = list(adapter.representations_of(model))
    else:
        names = list(getattr(adapter, "representations", ()))
    return [None, *names[1:]]


def check_adapter(
    model: nn.Module, images: Tensor, *, representations: list[str | None] | None = None, tokens: bool = True
) -> AdapterReport:
    """Check the adapter that decomposes ``model`` on ``images [B >= 2, 3, H, W]`` (see the module's
    docstring); raises ``AssertionError`` naming the first failure, returns the figures otherwise."""
    assert images.shape[0] >= 2, "check_adapter needs at least two images (batch independence)"
    adapter, target = adapter_for(model)
    reps = representations if representations is not None else representations_of(adapter, target)
    report = AdapterReport(adapter.family, _dotted(type(target)), list(reps))
    before = _hooks_and_patches(model)
    double, x64 = copy.deepcopy(model).double(), images.double()
    for rep in reps:
        _check_complete(model, images, rep, report)
        _check_complete(double, x64, rep, report)
        report.heads = _check_heads(adapter, double, x64, rep)
    report.batch_error = _check_batch(double, x64)
    if tokens:
        report.token_error = _check_tokens(double, x64)
    assert _hooks_and_patches(model) == before, f"{report.model_class}: a decomposition left a hook or patch"
    _CHECKED.add(report.model_class)
    return report


def unchecked_adapters() -> list[str]:
    """Plug-in model classes (registered at run time or named by an installed entry point) that no
    :func:`check_adapter` call of this process has covered."""
    return [name for name in plugin_names() if name not in _CHECKED]


def _check_complete(model: nn.Module, x: Tensor, rep: str | None, report: AdapterReport) -> None:
    d = decompose(model, x, representation=rep, check=0)
    dtype = d.representation.dtype
    tol = TOLERANCE.get(dtype, COMPLETENESS_TOLERANCE.get(dtype, 1e-4))
    err = d.error.max().item()
    report.error[f"{rep or 'default'} {str(dtype).removeprefix('torch.')}"] = err
    assert err <= tol, f"{report.model_class} ({rep or 'default'}, {dtype}): relative error {err:.2e} > {tol:.0e}"


def _check_heads(adapter: Adapter, model: nn.Module, x: Tensor, rep: str | None) -> int:
    """Every declared attention has one non-zero part per head; returns the number of heads."""
    _, target = adapter_for(model)
    plan = adapter.plan(target, start_layer=0, representation=rep, heads=True)
    blocks = [b for st in plan.stages for b in st.blocks]
    declared = [(b.layer, br.sublayer, br.num_heads) for b in blocks for br in b.branches if isinstance(br, Heads)]
    assert declared, f"{type(target).__name__}: the plan declares no attention heads"
    d = decompose(model, x, representation=rep)
    for layer, sub, n in declared:
        key = ("attn_head", layer, sub)
        idx = d.index(lambda lab, key=key: (lab.kind, lab.layer, lab.sublayer) == key)
        heads = sorted(d.labels[i].head for i in idx)
        assert heads == list(range(n)), f"layer {layer}: head parts {heads}, expected one for each of {n} heads"
        assert bool((d.contributions[:, idx].abs().amax(dim=(0, 2)) > 0).all()), f"layer {layer}: a head part is 0"
    return sum(n for _, _, n in declared)


def _check_batch(model: nn.Module, x: Tensor) -> float:
    whole = decompose(model, x)
    scale = whole.representation.abs().max().clamp_min(1e-30)
    worst = 0.0
    for i in (0, x.shape[0] - 1):
        alone = decompose(model, x[i : i + 1])
        worst = max(worst, ((whole.contributions[i : i + 1] - alone.contributions).abs().max() / scale).item())
    assert worst <= TOLERANCE[torch.float64], f"one image alone differs from its row in the batch: {worst:.1e}"
    return worst


def _check_tokens(model: nn.Module, x: Tensor) -> float:
    d = decompose(model, x, tokens=True)
    assert d.tokens, "tokens=True gave no token split"
    scale = d.representation.abs().max().clamp_min(1e-30)
    worst, covered = 0.0, 0
    for stack in d.tokens:
        idx = d.index([lab.name for lab in stack.labels])
        worst = max(worst, ((stack.values.sum(2) - d.contributions[:, idx]).abs().max() / scale).item())
        covered += len(stack.labels)
    assert covered == sum(lab.kind == "attn_head" for lab in d.labels), "not every head has a token split"
    assert worst <= TOLERANCE[torch.float64], f"token rows do not sum to their head: {worst:.1e}"
    return worst


def _hooks_and_patches(model: nn.Module) -> list:
    """Every hook on any module and every attribute a decomposition may patch (a forward, a fused
    attention switch, an attention implementation, the training flag)."""
    state = []
    for name, m in model.named_modules():
        config = getattr(m, "config", None)
        impl = getattr(config, "_attn_implementation", None)
        state.append((name, len(m._forward_hooks), len(m._forward_pre_hooks), "forward" in vars(m)))
        state.append((name, vars(m).get("fused_attn"), m.training, impl))
    return state
