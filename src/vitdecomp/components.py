"""The labelled stack of component contributions returned by :func:`vitdecomp.decompose`.

A :class:`Decomposition` holds one tensor ``contributions [B, C, D]`` and a list of ``C``
:class:`ComponentLabel` s; ``contributions.sum(1)`` reproduces ``representation [B, D]``, and
``error`` says how closely (relative L2 per image).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import torch

#: Component kinds, in the order they appear inside a block.
KINDS = (
    "init",  # everything before the first decomposed block (embeddings, stem, folded layers)
    "attn_head",  # one attention head's output-projection slice (times layer scale)
    "attn_bias",  # the attention output-projection bias (times layer scale)
    "attn",  # a whole attention branch (with heads=False)
    "mlp",  # a whole MLP branch (non-linear, one component)
    "conv",  # a whole convolutional branch (MaxViT MBConv), one component
    "transition_bias",  # constants added between stages (patch-merging norm beta, downsample bias)
    "norm_bias",  # the beta of the final norm
    "fc_norm_bias",  # the beta of a norm applied to the pooled vector (timm fc_norm)
    "head_norm_bias",  # the beta of a classifier head's norm (MaxViT)
    "head_bias",  # the bias of a linear head / projection applied to the representation
    "pool_pos",  # an attention-pool head's position term (one per pool head)
    "pool_bias",  # an attention pool's value and projection biases
    "pool_mlp",  # an attention pool's MLP (non-linear, one component)
)


@dataclass(frozen=True)
class ComponentLabel:
    """What one component is.

    ``layer`` is the global block index (0 = first block); ``stage``/``block`` qualify it for
    hierarchical models (Swin, MaxViT), ``sublayer`` names the branch inside a block when a block
    has several attention branches (MaxViT's ``block``/``grid``).
    """

    kind: str
    layer: int | None = None
    head: int | None = None
    stage: int | None = None
    block: int | None = None
    sublayer: str | None = None

    @property
    def name(self) -> str:
        """A short unique string, e.g. ``L3.H5``, ``L3.mlp``, ``S2.B1.grid.H0``, ``init``."""
        if self.layer is None:
            name = self.kind if self.stage is None else f"S{self.stage}.{self.kind}"
            return name if self.head is None else f"{name}.H{self.head}"
        where = f"L{self.layer}" if self.stage is None else f"S{self.stage}.B{self.block}"
        if self.sublayer:
            where += f".{self.sublayer}"
        if self.kind == "attn_head":
            return f"{where}.H{self.head}"
        if self.kind == "attn_bias":
            return f"{where}.attn_bias"
        return f"{where}.{self.kind}"

    def __str__(self) -> str:
        return self.name


@dataclass
class TokenContributions:
    """Per-source-token contributions of attention heads that read from one token grid.

    ``values [B, H, N, D]``: ``values[:, i].sum(1)`` equals the contribution of head ``labels[i]``.
    ``pixel_boxes [N, 4]`` gives ``(top, left, bottom, right)`` pixel bounds of each source token in
    the model's input image (``-1`` rows for tokens with no place: class / register tokens).
    """

    values: torch.Tensor
    labels: list[ComponentLabel]
    pixel_boxes: torch.Tensor
    grid_size: tuple[int, int]
    num_prefix_tokens: int = 0

    def heatmap(self, direction: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token scores ``[B, H, N]`` (projection on ``direction [D]``, or the norm)."""
        if direction is None:
            return self.values.norm(dim=-1)
        return self.values @ direction.to(self.values)


@dataclass
class Decomposition:
    """The representation of a batch split into additive components.

    contributions  [B, C, D]  one row per component, in ``labels`` order
    representation [B, D]     the model's own output for the chosen representation
    tokens         token-level splits of head contributions, one entry per token grid (stage)
    """

    contributions: torch.Tensor
    labels: list[ComponentLabel]
    representation: torch.Tensor
    tokens: list[TokenContributions] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.contributions.shape[1] != len(self.labels):
            raise ValueError(f"{self.contributions.shape[1]} contribution rows but {len(self.labels)} labels")

    @property
    def names(self) -> list[str]:
        return [label.name for label in self.labels]

    @property
    def error(self) -> torch.Tensor:
        """Relative completeness error per image ``[B]``: ||sum of parts - repr|| / ||repr||."""
        total = self.contributions.sum(1, dtype=torch.float64)
        ref = self.representation.to(torch.float64)
        return (total - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)

    def index(self, where: Callable[[ComponentLabel], bool] | Iterable[str] | str) -> list[int]:
        """Positions of the components selected by a predicate, a name, or a list of names."""
        if isinstance(where, str):
            where = [where]
        if callable(where):
            return [i for i, label in enumerate(self.labels) if where(label)]
        wanted = list(where)
        lookup = {name: i for i, name in enumerate(self.names)}
        missing = [n for n in wanted if n not in lookup]
        if missing:
            raise KeyError(f"no component named {missing}; names look like {self.names[:4]}")
        return [lookup[n] for n in wanted]

    def select(self, where: Callable[[ComponentLabel], bool] | Iterable[str] | str) -> Decomposition:
        """A decomposition restricted to the selected components (``representation`` is kept)."""
        idx = self.index(where)
        return replace(self, contributions=self.contributions[:, idx], labels=[self.labels[i] for i in idx])

    def sum(self, where: Callable[[ComponentLabel], bool] | Iterable[str] | str | None = None) -> torch.Tensor:
        """The summed contribution ``[B, D]`` of the selected components (all when ``None``)."""
        if where is None:
            return self.contributions.sum(1)
        return self.contributions[:, self.index(where)].sum(1)

    def group(self, key: Callable[[ComponentLabel], object]) -> tuple[torch.Tensor, list[object]]:
        """Sum components sharing ``key(label)``: ``([B, G, D], group keys in first-seen order)``."""
        keys: list[object] = []
        slot: dict[object, int] = {}
        for label in self.labels:
            k = key(label)
            if k not in slot:
                slot[k] = len(keys)
                keys.append(k)
        index = torch.tensor([slot[key(label)] for label in self.labels], device=self.contributions.device)
        out = self.contributions.new_zeros(self.contributions.shape[0], len(keys), self.contributions.shape[2])
        out.index_add_(1, index, self.contributions)
        return out, keys

    def by_layer(self) -> tuple[torch.Tensor, list[object]]:
        """Contributions summed per block ``[B, L', D]`` (init and constants are their own groups)."""
        return self.group(lambda lab: lab.name.split(".")[0] if lab.layer is None else (lab.stage, lab.layer))

    def __len__(self) -> int:
        return len(self.labels)

    def summary(self) -> str:
        """A few human-readable lines: shape, component kinds, completeness."""
        kinds: dict[str, int] = {}
        for label in self.labels:
            kinds[label.kind] = kinds.get(label.kind, 0) + 1
        err = self.error
        lines = [
            f"{len(self.labels)} components x {self.contributions.shape[-1]} dims for "
            f"{self.contributions.shape[0]} images ({self.contributions.dtype})",
            "kinds: " + ", ".join(f"{k}={v}" for k, v in kinds.items()),
            f"completeness: max relative error {err.max().item():.2e} (mean {err.mean().item():.2e})",
        ]
        for tok in self.tokens:
            lines.append(
                f"tokens: {len(tok.labels)} heads x {tok.values.shape[2]} source tokens "
                f"(grid {tok.grid_size[0]}x{tok.grid_size[1]})"
            )
        return "\n".join(lines)


def stack_labels(parts: Sequence[tuple[ComponentLabel, torch.Tensor]]) -> tuple[torch.Tensor, list[ComponentLabel]]:
    """Stack ``(label, [B, D])`` pairs into ``([B, C, D], labels)``."""
    return torch.stack([t for _, t in parts], 1), [lab for lab, _ in parts]
