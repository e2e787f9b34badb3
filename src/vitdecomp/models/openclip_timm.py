"""open_clip's ``TimmModel``: the image tower of the open_clip models built on a timm trunk (SigLIP and
SigLIP 2, EVA-02 / EVA-CLIP, Perception Encoder, ...).

``TimmModel.forward`` is ``head(trunk(x))``. The trunk's own forward runs its blocks, pooling (SigLIP's
MAP head inside the trunk), ``fc_norm`` and — when open_clip made the trunk's classifier the projection
(``timm_proj`` null, e.g. EVA-02) — its linear ``head``; the wrapper's ``head`` then holds a dropout and a
linear ``proj`` (``timm_proj="linear"``) or nothing (``"none"``, SigLIP). The trunk is decomposed by its own
timm adapter (any registered timm class: its blocks, heads, pooling, norms), the wrapper's projection is
one more linear readout step (its bias: ``proj_bias``).

Representation ``"embedding"``: what ``encode_image`` returns before L2 normalisation (the wrapper's
output). Refused: ``timm_proj="mlp"`` (not linear) and the ``abs_attn`` / ``rot_attn`` pools (ResNet
trunks), and a trunk whose class has no adapter (named by its path under ``trunk``).
"""

from __future__ import annotations

import dataclasses

from open_clip.timm_model import TimmModel
from torch import nn

from vitdecomp.decomp.plan import Linear, Plan, Tap
from vitdecomp.errors import UnsupportedModuleError
from vitdecomp.models.registry import adapter_for

REPRESENTATIONS = ("embedding",)


def head_steps(model: TimmModel) -> list[Linear]:
    """The wrapper's head after the trunk as readout steps (dropouts are identities in eval mode)."""
    steps = []
    for name, module in model.head.named_children():
        if isinstance(module, nn.Dropout):
            continue
        if name != "proj" or type(module) is not nn.Linear:
            raise UnsupportedModuleError(f"head.{name}", module, "only a linear projection after the trunk")
        steps.append(Linear(module.weight, module.bias, "proj_bias"))
    return steps


def trunk_plan(model: TimmModel, start_layer: int, heads: bool) -> Plan:
    """The trunk's own plan, for the output its forward gives: through its linear classifier when open_clip
    made that the projection, else its default representation (pooled features)."""
    trunk = model.trunk
    try:
        adapter, _ = adapter_for(trunk)
        rep = "logits" if getattr(trunk, "num_classes", 0) else None
        return adapter.plan(trunk, start_layer=start_layer, representation=rep, heads=heads)
    except UnsupportedModuleError as err:
        raise _in_trunk(trunk, err) from err
    except ValueError as err:
        if str(err).startswith("start_layer"):
            raise
        raise UnsupportedModuleError("trunk", trunk, f"its classifier is not a linear projection ({err})") from err


def _in_trunk(trunk: nn.Module, err: UnsupportedModuleError) -> UnsupportedModuleError:
    """The same refusal, its path given from the wrapper (``trunk.<path>``)."""
    try:
        module = trunk.get_submodule(err.path) if err.path else trunk
    except AttributeError:  # a descriptive path (e.g. "<attn> post-norm"): keep the trunk's message
        return err
    why = str(err).split(": ", 1)[1] if ": " in str(err) else ""
    return UnsupportedModuleError(f"trunk.{err.path}" if err.path else "trunk", module, why)


class OpenClipTimmAdapter:
    family = "open_clip-timm"

    def plan(self, model: TimmModel, *, start_layer: int, representation: str | None, heads: bool) -> Plan:
        if representation not in (None, *REPRESENTATIONS):
            raise ValueError(f"representation must be one of {REPRESENTATIONS}, not {representation!r}")
        steps = head_steps(model)
        plan = trunk_plan(model, start_layer, heads)  # checks start_layer against the trunk's depth
        readout = dataclasses.replace(
            plan.readout, steps=[*plan.readout.steps, *steps], output=Tap(model), output_fn=None
        )
        meta = {**plan.meta, "representation": REPRESENTATIONS[0], "trunk": plan.family}
        return dataclasses.replace(plan, family=self.family, readout=readout, run=model, meta=meta)
