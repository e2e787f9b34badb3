"""What an adapter is written with: the public face of the plan vocabulary, the shared helpers and
the registration of a plug-in (a walk-through: docs/adding-a-family.md).

An adapter is an object with a ``family`` name and ``plan(model, *, start_layer, representation, heads)``
returning a :class:`Plan` made only of declarations — where the residual branches are (:class:`Heads`,
:class:`Field`), how blocks and token grids are laid out (:class:`Block`, a norm at a block's end :class:`StreamNorm`,
:class:`Stage`), and how the
final stream becomes the representation (:class:`Readout` of :class:`TokenNorm`, :class:`Pool`,
:class:`AttentionPool`, :class:`MultiheadPool`, :class:`VectorNorm`, :class:`Linear`). The engine
attaches the hooks, freezes the pass's non-linear quantities and does all the bookkeeping.
"""

from __future__ import annotations

from vitdecomp.decomp.plan import (
    AttentionPool,
    Block,
    Field,
    Heads,
    Linear,
    Merge,
    MultiheadPool,
    Plan,
    Pool,
    Readout,
    Shortcut,
    Stage,
    StreamNorm,
    Tap,
    TokenNorm,
    Values,
    VectorNorm,
    Windows,
)
from vitdecomp.models._common import (
    check_plan_args,
    fused_qkv_values,
    layer_scale_of,
    linear_values,
    mlp_field,
    token_model_plan,
)
from vitdecomp.models.registry import ENTRY_POINT_GROUP, Adapter, register_adapter

__all__ = [
    "ENTRY_POINT_GROUP",
    "Adapter",
    "AttentionPool",
    "Block",
    "Field",
    "Heads",
    "Linear",
    "Merge",
    "MultiheadPool",
    "Plan",
    "Pool",
    "Readout",
    "Shortcut",
    "Stage",
    "StreamNorm",
    "Tap",
    "TokenNorm",
    "Values",
    "VectorNorm",
    "Windows",
    "check_plan_args",
    "fused_qkv_values",
    "layer_scale_of",
    "linear_values",
    "mlp_field",
    "register_adapter",
    "token_model_plan",
]
