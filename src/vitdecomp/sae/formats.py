"""SAE files: vitdecomp's own, and the published layouts of saev and ViT-Prisma / sae-lens.

* **vitdecomp**: one ``.safetensors`` file (tensors ``w_enc [L, D]``, ``b_enc``, ``w_dec [L, D]``,
  ``b_dec``, and ``shift`` / ``threshold`` when used) whose metadata ``"vitdecomp_sae"`` holds the
  rest as JSON (:func:`save_sae`).
* **ViT-Prisma / sae-lens**: a folder (or its weights file) with ``config.json`` (Prisma) or
  ``cfg.json`` (sae-lens) beside ``weights.safetensors`` / ``sae_weights.safetensors`` (or a
  ``weights.pt`` holding a plain state dict): ``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec [d_sae,
  d_in]``, ``b_dec`` (+ ``threshold`` for JumpReLU); the config's ``activation_fn_str`` /
  ``architecture`` (``relu``, ``topk`` with ``activation_fn_kwargs.k``, ``jumprelu``),
  ``normalize_activations`` (``none``, ``layer_norm``, ``constant_norm_rescale``) and
  ``apply_b_dec_to_input`` (default true: the decoder bias is subtracted from the normalised input).
* **saev**: one file, a JSON header line (``schema``, ``cfg``: ``d_model`` or ``d_vit``, ``d_sae`` or
  ``exp_factor``, ``activation``: ``Relu`` / ``TopK`` (``top_k``) / ``BatchTopK``) followed by a
  ``torch.save`` state dict (``W_enc [d_model, d_sae]``, ``b_enc``, ``W_dec [d_sae, d_model]``,
  ``b_dec``; BatchTopK's inference threshold ``activation.threshold``). saev encodes ``x W_enc +
  b_enc`` (no decoder bias subtracted). saev's TopK keeps a negative value that makes the top k;
  here it is zeroed, as Prisma and overcomplete do (it matters only when fewer than k are positive).

Weights are read with safetensors or ``torch.load(weights_only=True)`` only: a ``.pt`` that pickles
Python objects (Prisma's published ``weights.pt`` stores its config class) is refused with how to
convert it. An SAE of another width than the representation is refused (:func:`check_fits`).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vitdecomp.errors import CheckpointError, UsageError
from vitdecomp.fsio import atomic_write_bytes
from vitdecomp.sae.model import SparseAutoencoder

#: The metadata key of vitdecomp's own SAE files, and their version.
META_KEY = "vitdecomp_sae"
FORMAT_VERSION = 1
#: ``normalize_activations`` of Prisma / sae-lens configs -> this package's ``input_norm``.
PRISMA_NORMS = {"none": "none", "layer_norm": "layer_norm", "constant_norm_rescale": "norm_rescale"}
#: Weight files looked for beside a Prisma / sae-lens config, in this order.
WEIGHT_FILES = ("weights.safetensors", "sae_weights.safetensors", "weights.pt")
CONFIG_FILES = ("config.json", "cfg.json")


def tensors(sae: SparseAutoencoder) -> dict[str, Tensor]:
    """The SAE's tensors as its file holds them (float32, CPU)."""
    named = {name: getattr(sae, name) for name in ("w_enc", "b_enc", "w_dec", "b_dec", "shift", "threshold")}
    return {k: torch.as_tensor(v).detach().float().cpu().contiguous() for k, v in named.items() if v is not None}


def metadata(sae: SparseAutoencoder) -> dict[str, str]:
    """The rest of the SAE, as the file's metadata."""
    config = {
        "version": FORMAT_VERSION,
        "activation": sae.activation,
        "k": sae.k,
        "input_norm": sae.input_norm,
        "gain": sae.gain,
        "subtract_b_dec": sae.subtract_b_dec,
        "eps": sae.eps,
        "source": sae.source,
        "info": sae.info,
    }
    return {META_KEY: json.dumps(config)}


def save_sae(sae: SparseAutoencoder, path: str | Path) -> Path:
    """Write ``sae`` as one safetensors file (atomically); returns its path."""
    from safetensors.torch import save

    return atomic_write_bytes(path, save(tensors(sae), metadata=metadata(sae)))


def load_sae(path: str | Path) -> SparseAutoencoder:
    """Read an SAE from ``path`` in any of the layouts above (one-line error otherwise)."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"--sae {path}: no such file or folder")
    config = next((path / n for n in CONFIG_FILES if (path / n).is_file()), None) if path.is_dir() else None
    if path.is_file():
        config = next((path.parent / n for n in CONFIG_FILES if (path.parent / n).is_file()), None)
        if path.suffix == ".safetensors" and _own_metadata(path) is not None:
            return _load_own(path)
        if config is None and _starts_with_json(path):
            return _load_saev(path)
    if config is not None:
        return _load_prisma(config, path if path.is_file() else None)
    raise UsageError(
        f"--sae {path}: not an SAE this version reads (a vitdecomp .safetensors, a saev file, or a ViT-Prisma / "
        "sae-lens folder with config.json or cfg.json beside weights.safetensors)"
    )


def check_fits(sae: SparseAutoencoder, dim: int, what: str) -> None:
    """Refuse an SAE whose input width is not the representation's (``what`` names the latter)."""
    if sae.d_in != dim:
        raise UsageError(
            f"the SAE reads {sae.d_in}-dim inputs ({sae.source}), {what} is {dim}-dim: give an SAE trained on it"
        )


# ---------------------------------------------------------------------------- vitdecomp's own
def _own_metadata(path: Path) -> dict[str, Any] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = (f.metadata() or {}).get(META_KEY)
    except Exception as err:  # safetensors raises its own error types for a damaged header
        raise CheckpointError(f"--sae {path}: not a readable safetensors file ({err})") from None
    return None if meta is None else json.loads(meta)


def _load_own(path: Path) -> SparseAutoencoder:
    from safetensors.torch import load_file

    cfg, t = _own_metadata(path) or {}, load_file(str(path))
    if cfg.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"--sae {path}: SAE file version {cfg.get('version')}, this vitdecomp reads 1")
    return SparseAutoencoder(
        t["w_enc"],
        t["b_enc"],
        t["w_dec"],
        t["b_dec"],
        activation=cfg["activation"],
        k=cfg.get("k"),
        threshold=t.get("threshold"),
        input_norm=cfg.get("input_norm", "none"),
        shift=t.get("shift"),
        gain=float(cfg.get("gain", 1.0)),
        subtract_b_dec=bool(cfg.get("subtract_b_dec", False)),
        eps=float(cfg.get("eps", 1e-5)),
        source=cfg.get("source", "vitdecomp"),
        info=dict(cfg.get("info", {})),
    )


# ---------------------------------------------------------------------------- saev
def _starts_with_json(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(1) == b"{"


def _weights_only(data: bytes | Path, where: Path) -> dict[str, Tensor]:
    """A state dict read with ``torch.load(weights_only=True)``; pickled objects are refused."""
    try:
        state = torch.load(io.BytesIO(data) if isinstance(data, bytes) else data, weights_only=True, map_location="cpu")
    except Exception:  # an unpickling error names the class it refused; a damaged file, whatever broke
        raise CheckpointError(
            f"--sae {where}: its weights are not a plain state dict that torch.load(weights_only=True) reads (it "
            "pickles Python objects, or is damaged); vitdecomp reads weights with safetensors or weights_only only: "
            "save its tensors W_enc, b_enc, W_dec, b_dec with safetensors.torch.save_file as weights.safetensors "
            "beside its config"
        ) from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or "W_enc" not in state:
        raise CheckpointError(f"--sae {where}: no W_enc in its weights")
    return state


def _saev_activation(header: dict[str, Any], cfg: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    act = cfg.get("activation")
    if isinstance(act, dict):
        return str(act.get("cls", "Relu")), dict(act.get("params", {}))
    if header.get("cls") in ("Relu", "TopK", "BatchTopK"):  # schema 1, format 1A
        return str(header["cls"]), {"top_k": cfg.get("top_k", 32)}
    return "Relu", {}


def _load_saev(path: Path) -> SparseAutoencoder:
    with open(path, "rb") as f:
        header, rest = json.loads(f.readline()), f.read()
    cfg = dict(header.get("cfg", header))
    state = _weights_only(rest, path)
    kind, params = _saev_activation(header, cfg)
    threshold, k, activation = None, None, "relu"
    if kind == "TopK":
        activation, k = "topk", int(params.get("top_k", 32))
    elif kind == "BatchTopK":
        activation, threshold = "threshold", state.get("activation.threshold", torch.tensor(0.0)).float()
    elif kind != "Relu":
        raise UsageError(f"--sae {path}: saev activation {kind!r} is not supported (Relu, TopK, BatchTopK)")
    info = {"format": "saev", "schema": header.get("schema"), "activation": kind, **params}
    return _from_state(state, activation=activation, k=k, threshold=threshold, source="saev", info=info)


def _from_state(state: dict[str, Tensor], **kw: Any) -> SparseAutoencoder:
    """An SAE from the ``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec [d_sae, d_in]``, ``b_dec`` that saev,
    Prisma and sae-lens share."""
    w_enc, w_dec = state["W_enc"].float().T.contiguous(), state["W_dec"].float()
    return SparseAutoencoder(w_enc, state["b_enc"].float(), w_dec, state["b_dec"].float(), **kw)


# ---------------------------------------------------------------------------- ViT-Prisma / sae-lens
def _prisma_activation(cfg: dict[str, Any], where: Path) -> tuple[str, int | None]:
    kind = str(cfg.get("activation_fn_str") or cfg.get("activation_fn") or "relu").lower()
    arch = str(cfg.get("architecture", "standard")).lower()
    if arch == "jumprelu":
        return "threshold", None
    if kind == "topk" or arch == "topk":
        k = (cfg.get("activation_fn_kwargs") or {}).get("k", cfg.get("k"))
        if k is None:
            raise UsageError(f"--sae {where}: a topk SAE without k in its config")
        return "topk", int(k)
    if kind != "relu" or arch not in ("standard", "topk"):
        raise UsageError(f"--sae {where}: architecture {arch!r} / activation {kind!r} is not supported")
    return "relu", None


def _prisma_weights(config: Path, weights: Path | None) -> tuple[dict[str, Tensor], Path]:
    path = weights or next((config.parent / n for n in WEIGHT_FILES if (config.parent / n).is_file()), None)
    if path is None:
        raise UsageError(f"--sae {config.parent}: no {' / '.join(WEIGHT_FILES)} beside {config.name}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path)), path
    return _weights_only(path, path), path


def _load_prisma(config: Path, weights: Path | None) -> SparseAutoencoder:
    cfg = json.loads(config.read_text())
    state, path = _prisma_weights(config, weights)
    activation, k = _prisma_activation(cfg, config)
    norm = str(cfg.get("normalize_activations", "none"))
    if norm not in PRISMA_NORMS:
        raise UsageError(f"--sae {config}: normalize_activations {norm!r} is not supported ({sorted(PRISMA_NORMS)})")
    source = "prisma" if config.name == "config.json" else "sae-lens"
    keep = ("d_in", "d_sae", "expansion_factor", "hook_point", "hook_point_layer", "model_name", "cls_token_only")
    return _from_state(
        state,
        activation=activation,
        k=k,
        threshold=state["threshold"].float() if "threshold" in state else None,
        input_norm=PRISMA_NORMS[norm],
        subtract_b_dec=bool(cfg.get("apply_b_dec_to_input", True)),
        source=source,
        info={"format": source, "weights": path.name, **{key: cfg[key] for key in keep if key in cfg}},
    )
