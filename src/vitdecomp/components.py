"""The labelled stack of component contributions returned by :func:`vitdecomp.decompose`.

A :class:`Decomposition` holds one tensor ``contributions [B, C, D]`` and a list of ``C``
:class:`ComponentLabel` s; ``contributions.sum(1)`` reproduces ``representation [B, D]``, and
``error`` says how closely (relative L2 per image).
"""

from __future__ import annotations

import html
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from vitdecomp import savefile
from vitdecomp.errors import VitDecompError


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
    ``projected``: ``values [B, H, N, k]`` hold only the projections on the ``k`` directions given to
    ``decompose(token_directions=)`` (the vectors themselves were never formed).
    """

    values: torch.Tensor
    labels: list[ComponentLabel]
    pixel_boxes: torch.Tensor
    grid_size: tuple[int, int]
    num_prefix_tokens: int = 0
    projected: bool = False

    def heatmap(self, direction: torch.Tensor | int | None = None) -> torch.Tensor:
        """Per-token scores ``[B, H, N]``: the projection on ``direction [D]``, or the norm (``None``).
        Projected values (``token_directions``) are already projections: ``direction`` is then the
        index of one of the ``k`` directions (``None`` when ``k == 1``)."""
        if self.projected:
            k = self.values.shape[-1]
            if direction is None and k == 1:
                return self.values[..., 0]
            if isinstance(direction, int) and -k <= direction < k:
                return self.values[..., direction]
            raise VitDecompError(
                f"these token values are projections on {k} directions (decompose(token_directions=)): "
                f"give the index of one (0..{k - 1}), not {'a vector' if torch.is_tensor(direction) else direction!r}"
            )
        if isinstance(direction, int):
            raise VitDecompError("an index picks one of the token_directions; these values are vectors: give [D]")
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
        return SetSummary().add(self).text()

    # ----------------------------------------------------------------- files and notebooks
    def save(self, folder: str | Path, ids: Sequence[str] | None = None, meta: dict | None = None) -> Path:
        """Write ``folder/decomposition.safetensors`` + ``folder/labels.json`` (see
        :mod:`vitdecomp.savefile`: plain arrays and JSON, readable without vitdecomp)."""
        return savefile.save_arrays(folder, self.file_arrays(), self.file_description(ids, meta))

    def file_arrays(self) -> dict[str, np.ndarray]:
        """The arrays :meth:`save` writes (:mod:`vitdecomp.savefile`), as numpy arrays."""
        arrays = {
            "contributions": _np(self.contributions),
            "representation": _np(self.representation),
            "error": _np(self.error.float()),
        }
        for i, tok in enumerate(self.tokens):
            arrays[f"tokens.{i}"] = _np(tok.values)
            arrays[f"tokens.{i}.pixel_boxes"] = _np(tok.pixel_boxes)
        return arrays

    def file_description(self, ids: Sequence[str] | None = None, meta: dict | None = None) -> dict:
        """The labels.json document :meth:`save` writes (less its format and version); its ``arrays``
        name each array with the images on its first axis."""
        stacks = [
            {
                "array": f"tokens.{i}",
                "labels": [lab.name for lab in tok.labels],
                "components": [asdict(lab) for lab in tok.labels],
                "grid_size": list(tok.grid_size),
                "num_prefix_tokens": tok.num_prefix_tokens,
                "projected": tok.projected,
            }
            for i, tok in enumerate(self.tokens)
        ]
        return {
            "labels": self.names,
            "components": [asdict(lab) for lab in self.labels],
            "ids": None if ids is None else [str(i) for i in ids],
            "tokens": stacks,
            "arrays": {
                "contributions": ["image", "component", "dim"],
                "representation": ["image", "dim"],
                "error": ["image"],
                **{s["array"]: ["image", "head", "token", "direction" if s["projected"] else "dim"] for s in stacks},
            },
            "meta": {**{k: v for k, v in self.meta.items() if isinstance(v, (str, int, float, bool))}, **(meta or {})},
        }

    @classmethod
    def load(cls, folder: str | Path) -> Decomposition:
        """A decomposition saved by :meth:`save` (``meta["ids"]``: the image ids, when saved)."""
        arrays, doc = savefile.load_arrays(folder)
        tokens = [
            TokenContributions(
                values=torch.from_numpy(arrays[s["array"]]),
                labels=[ComponentLabel(**c) for c in s["components"]],
                pixel_boxes=torch.from_numpy(arrays[s["array"] + ".pixel_boxes"]),
                grid_size=tuple(s["grid_size"]),
                num_prefix_tokens=s["num_prefix_tokens"],
                projected=s.get("projected", False),
            )
            for s in doc["tokens"]
        ]
        return cls(
            contributions=torch.from_numpy(arrays["contributions"]),
            labels=[ComponentLabel(**c) for c in doc["components"]],
            representation=torch.from_numpy(arrays["representation"]),
            tokens=tokens,
            meta={**doc.get("meta", {}), "ids": doc.get("ids")},
        )

    def to_pandas(self):
        """One row per component (index: its name): the label's fields, its mean L2 norm over the
        images and that norm's share of the sum of all components' norms. Needs pandas."""
        try:
            import pandas as pd
        except ImportError as err:
            raise ImportError("Decomposition.to_pandas needs pandas: pip install pandas") from err
        norms = self.contributions.float().norm(dim=-1).mean(0).cpu().numpy()
        rows = [{**asdict(lab), "mean_norm": float(n)} for lab, n in zip(self.labels, norms, strict=True)]
        df = pd.DataFrame(rows, index=pd.Index(self.names, name="component"))
        df["share"] = df["mean_norm"] / max(float(norms.sum()), 1e-30)
        return df

    def _repr_html_(self) -> str:
        """A notebook summary: the shape, completeness and the largest components."""
        norms = self.contributions.float().norm(dim=-1).mean(0)
        top = torch.argsort(norms, descending=True)[:10].tolist()
        rows = "".join(
            f"<tr><td><code>{html.escape(self.names[i])}</code></td><td>{self.labels[i].kind}</td>"
            f"<td style='text-align:right'>{norms[i].item():.4g}</td></tr>"
            for i in top
        )
        head = html.escape(self.summary()).replace("\n", "<br>")
        return (
            f"<div><b>Decomposition</b><br><small>{head}</small><table><thead><tr><th>largest components</th>"
            f"<th>kind</th><th>mean norm</th></tr></thead><tbody>{rows}</tbody></table></div>"
        )


@dataclass
class SetSummary:
    """What :meth:`Decomposition.summary` says of a set of images, gathered batch by batch
    (:meth:`add`), so that a set is summarised without holding it: the number of images ``n``, the
    largest and the summed completeness errors, each component's summed L2 norm ``norm_sum [C]``."""

    n: int = 0
    err_max: float = 0.0
    err_sum: float = 0.0
    norm_sum: torch.Tensor | None = None
    names: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    def add(self, d: Decomposition) -> SetSummary:
        """One more batch (the first fixes the layout lines); returns ``self``."""
        if not self.names:
            kinds: dict[str, int] = {}
            for label in d.labels:
                kinds[label.kind] = kinds.get(label.kind, 0) + 1
            self.names = d.names
            self.lines = [
                f"{len(d.labels)} components x {d.contributions.shape[-1]} dims for {{n}} images "
                f"({d.contributions.dtype})",
                "kinds: " + ", ".join(f"{k}={v}" for k, v in kinds.items()),
                *(
                    f"tokens: {len(t.labels)} heads x {t.values.shape[2]} source tokens "
                    f"(grid {t.grid_size[0]}x{t.grid_size[1]})"
                    for t in d.tokens
                ),
            ]
        err = d.error
        norms = d.contributions.float().norm(dim=-1).sum(0).double().cpu()
        self.norm_sum = norms if self.norm_sum is None else self.norm_sum + norms
        self.err_max = max(self.err_max, float(err.max()))
        self.err_sum += float(err.sum())
        self.n += int(err.shape[0])
        return self

    def mean_norms(self) -> torch.Tensor:
        """``[C]``: each component's mean L2 norm over the images."""
        assert self.norm_sum is not None
        return self.norm_sum / max(self.n, 1)

    def text(self) -> str:
        mean = self.err_sum / max(self.n, 1)
        complete = f"completeness: max relative error {self.err_max:.2e} (mean {mean:.2e})"
        return "\n".join([self.lines[0].format(n=self.n), self.lines[1], complete, *self.lines[2:]])


def _np(x: torch.Tensor) -> np.ndarray:
    x = x.detach().cpu()
    return (x.float() if x.dtype == torch.bfloat16 else x).contiguous().numpy()
