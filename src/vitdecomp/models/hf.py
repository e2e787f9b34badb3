"""transformers vision towers: ``ViTModel``, ``DeiTModel``, ``Dinov2Model``, ``Dinov2WithRegistersModel``,
``DINOv3ViTModel``, ``CLIPVisionModel``, ``CLIPVisionModelWithProjection``, ``SiglipVisionModel``.

Stream: ``[B, prefix + gh*gw, D]`` at the layers (prefix: class token, DeiT's distillation token,
registers; SigLIP has none). Every layer is pre-norm and adds ``attn(norm(x))`` — split per head at the
input of the attention's output projection (``o_proj`` / ``out_proj``), times DINOv2's / DINOv3's layer
scale ``lambda1`` — and ``mlp(norm(x))`` (one component, whatever the MLP: GELU, SwiGLU, gated). CLIP's
``pre_layrnorm`` acts on the embeddings only, so it is part of ``init``; DINOv3's rotary embeddings act
only inside the attention probabilities, frozen from the pass.

The parts are read by hooks on the upstream modules, with whatever attention implementation the model
was built with (``eager``, ``sdpa``, ...). A token split needs the probabilities: for that pass only the
attention modules' config is switched to ``eager``, whose attention returns them.

Representations (named after the library's own outputs; default first):

- ``ViTModel``: ``"last_hidden_state[:, 0]"`` (the class token after the final layer norm; the tanh
  ``pooler_output`` is not linear), ``"patch_mean"``.
- ``DeiTModel``: ``"last_hidden_state[:, 0]"`` (class), ``"last_hidden_state[:, 1]"`` (distillation),
  ``"last_hidden_state[:, :2].mean(1)"`` (their mean, as the with-teacher head averages them), ``"patch_mean"``.
- ``Dinov2Model``, ``Dinov2WithRegistersModel``, ``DINOv3ViTModel``: ``"pooler_output"`` (the class token
  after the final layer norm), ``"patch_mean"``.
- ``CLIPVisionModel``: ``"pooler_output"`` (``post_layernorm`` of the class token), ``"patch_mean"``;
  ``CLIPVisionModelWithProjection``: ``"image_embeds"`` (``visual_projection`` of that),
  ``"vision_model.pooler_output"``, ``"patch_mean"``.
- ``SiglipVisionModel``: ``"pooler_output"`` (``post_layernorm`` then the attention-pooling head, an
  ``nn.MultiheadAttention`` with a learned probe: frozen probabilities, one readout slot per pool head;
  ``pool_bias`` and ``pool_mlp`` components), ``"patch_mean"`` (the default without a head).

``"patch_mean"``: the mean over the patch tokens of ``last_hidden_state`` (prefix tokens left out), the
vector the DINOv2 classification head concatenates to the class token.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from vitdecomp.decomp.plan import (
    Block,
    Heads,
    Linear,
    MultiheadPool,
    Plan,
    Pool,
    Readout,
    ReadoutStep,
    Tap,
    TokenNorm,
    Values,
    VectorNorm,
)
from vitdecomp.errors import UnsupportedModuleError
from vitdecomp.models._common import check_plan_args, layer_scale_of, mlp_field, token_model_plan

PATCH_MEAN = "patch_mean"


@dataclass(frozen=True)
class Tower:
    """Where a transformers vision tower keeps its parts: paths from the decomposed module, attribute
    names inside a layer, and class names looked up in the model's own modeling module (so that layers
    are matched exactly, without importing other families' modules)."""

    layers: str  # the ModuleList of layers
    layer_cls: str
    attention: str  # a layer's attention
    attention_cls: str
    out_proj: str  # the attention's output projection (its input: the heads' outputs)
    mlp: str  # the module whose output is the MLP branch as added (after a layer scale)
    patch_conv: str  # the patch embedding's Conv2d (its input: the image)
    layer_scale: str | None = None  # the module whose ``lambda1`` scales the attention branch


def _get(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


def _classes(model: nn.Module, *names: str) -> list[type]:
    module = sys.modules[type(model).__module__]
    return [getattr(module, n) for n in names]


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def hf_heads(attn: nn.Module, path: str, out_proj: nn.Linear, layer_scale: Tensor | None) -> Heads:
    """A transformers attention (``q_proj``/``k_proj``/``v_proj``, the interface returning
    ``(output, probabilities)``) as a :class:`Heads` declaration."""
    for name in ("q_proj", "k_proj", "v_proj"):
        if not isinstance(getattr(attn, name, None), nn.Linear):
            raise UnsupportedModuleError(path, attn, f"no nn.Linear {name}: not the attention layout of transformers 5")
    if "_attn_implementation_internal" not in vars(attn.config):
        raise UnsupportedModuleError(path, attn, "its config has no attention-implementation switch (transformers 5)")
    return Heads(
        attn,
        path,
        attn.num_heads if hasattr(attn, "num_heads") else attn.num_attention_heads,
        out_proj.weight,
        out_proj.bias,
        z=Tap(out_proj, "input"),
        probs=Tap(attn, "output", item=1),
        values=Values(Tap(attn.v_proj), lambda v: v),
        layer_scale=layer_scale,
        explicit=((attn.config, "_attn_implementation_internal", "eager"),),
    )


def tower_blocks(model: nn.Module, tower: Tower, start_layer: int) -> list[Block]:
    """Every layer from ``start_layer`` on, checked to be the tower's own layer and attention classes
    (all layers are checked)."""
    layer_cls, attn_cls = _classes(model, tower.layer_cls, tower.attention_cls)
    blocks = []
    for i, layer in enumerate(_get(model, tower.layers)):
        path = f"{tower.layers}.{i}"
        if type(layer) is not layer_cls:
            raise UnsupportedModuleError(path, layer, f"only transformers' {tower.layer_cls} is supported")
        attn = getattr(layer, tower.attention)
        if type(attn) is not attn_cls:
            raise UnsupportedModuleError(f"{path}.{tower.attention}", attn, f"only {tower.attention_cls}")
        scale = None
        if tower.layer_scale is not None:
            scale = layer_scale_of(getattr(getattr(layer, tower.layer_scale), "lambda1", None), path)
        if i >= start_layer:
            heads = hf_heads(attn, f"{path}.{tower.attention}", getattr(attn, tower.out_proj), scale)
            blocks.append(Block(path, layer, i, [heads, mlp_field(getattr(layer, tower.mlp), f"{path}.mlp")]))
    return blocks


def token_readout(norm: nn.Module, positions: tuple[int, ...], weights: tuple[float, ...] | None = None) -> Readout:
    """The final layer norm on every token, then the tokens at ``positions`` (weighted)."""

    def own(t: Tensor) -> Tensor:  # the model's own value: last_hidden_state read at those tokens
        w = weights or (1.0,) * len(positions)
        return sum(wi * t[:, p] for wi, p in zip(w, positions, strict=True))

    steps: list[ReadoutStep] = [TokenNorm(norm), Pool(positions=positions, weights=weights)]
    return Readout(Tap(norm, "input"), steps, Tap(norm), output_fn=own)


def patch_mean_readout(stream: Tap, norm: nn.Module | None, skip: int) -> Readout:
    """The mean of ``last_hidden_state`` over the patch tokens (after the final norm, when it has one)."""
    steps: list[ReadoutStep] = ([TokenNorm(norm)] if norm is not None else []) + [Pool(skip=skip)]
    output = Tap(norm) if norm is not None else stream
    return Readout(stream, steps, output, output_fn=lambda t: t[:, skip:].mean(1))


class HFTowerAdapter:
    """The plan shared by the transformers towers: a subclass names its :class:`Tower`, its number of
    prefix tokens and its readouts (``readouts(model) -> {representation: Readout factory}``, default
    first; by default the class token after the final norm, named ``class_token``, and the patch mean)."""

    family = ""
    tower: Tower
    class_token = "pooler_output"

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.layernorm

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return 1 + getattr(model.config, "num_register_tokens", 0)

    def readouts(self, model: nn.Module) -> dict[str, Callable[[], Readout]]:
        norm, npre = self.final_norm(model), self.num_prefix_tokens(model)
        return {
            self.class_token: lambda: token_readout(norm, (0,)),
            PATCH_MEAN: lambda: patch_mean_readout(Tap(norm, "input"), norm, npre),
        }

    def representations_of(self, model: nn.Module) -> tuple[str, ...]:
        """The representations this model offers, the default first."""
        return tuple(self.readouts(model))

    def plan(self, model: nn.Module, *, start_layer: int, representation: str | None, heads: bool) -> Plan:
        layers = _get(model, self.tower.layers)
        readouts = self.readouts(model)
        representation = check_plan_args(representation, tuple(readouts), start_layer, len(layers))
        patch = _pair(model.config.patch_size)
        return token_model_plan(
            self.family,
            model,
            tower_blocks(model, self.tower, start_layer),
            block_modules=layers,
            start_layer=start_layer,
            num_prefix_tokens=self.num_prefix_tokens(model),
            patch=patch,
            image_tap=Tap(_get(model, self.tower.patch_conv), "input", "nchw"),
            readout=readouts[representation](),
            meta={"representation": representation, "start_layer": start_layer, "num_blocks": len(layers)},
        )


def _vit_tower(prefix: str) -> Tower:
    return Tower("layers", f"{prefix}Layer", "attention", f"{prefix}Attention", "o_proj", "mlp",
                 "embeddings.patch_embeddings.projection")  # fmt: skip


def _dinov2_tower(prefix: str, layers: str = "encoder.layer", conv: str = "embeddings.patch_embeddings.projection"):
    return Tower(layers, f"{prefix}Layer", "attention", f"{prefix}Attention", "o_proj", "layer_scale2", conv,
                 layer_scale="layer_scale1")  # fmt: skip


class HFViTAdapter(HFTowerAdapter):
    family = "hf-vit"
    tower = _vit_tower("ViT")
    class_token = "last_hidden_state[:, 0]"


class HFDeiTAdapter(HFViTAdapter):
    family = "hf-deit"
    tower = _vit_tower("DeiT")

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return 2

    def readouts(self, model: nn.Module) -> dict[str, Callable[[], Readout]]:
        norm, base = model.layernorm, super().readouts(model)
        return {
            self.class_token: base[self.class_token],
            "last_hidden_state[:, 1]": lambda: token_readout(norm, (1,)),
            "last_hidden_state[:, :2].mean(1)": lambda: token_readout(norm, (0, 1), (0.5, 0.5)),
            PATCH_MEAN: base[PATCH_MEAN],
        }


class HFDinov2Adapter(HFTowerAdapter):
    family = "hf-dinov2"
    tower = _dinov2_tower("Dinov2")


class HFDinov2RegistersAdapter(HFTowerAdapter):
    family = "hf-dinov2-registers"
    tower = _dinov2_tower("Dinov2WithRegisters")


class HFDINOv3Adapter(HFTowerAdapter):
    family = "hf-dinov3"
    tower = _dinov2_tower("DINOv3ViT", layers="model.layer", conv="embeddings.patch_embeddings")

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.norm


def _clip_tower(prefix: str = "", family: str = "CLIP") -> Tower:
    return Tower(f"{prefix}encoder.layers", f"{family}EncoderLayer", "self_attn", f"{family}Attention", "out_proj",
                 "mlp", f"{prefix}embeddings.patch_embedding")  # fmt: skip


class HFCLIPVisionAdapter(HFTowerAdapter):
    family = "hf-clip"
    tower = _clip_tower()

    def vision(self, model: nn.Module) -> nn.Module:
        return model

    def readouts(self, model: nn.Module) -> dict[str, Callable[[], Readout]]:
        vision = self.vision(model)
        stream = Tap(vision.encoder.layers[-1])  # last_hidden_state: no norm on the tokens
        pooled = [Pool(positions=(0,)), VectorNorm(vision.post_layernorm, "norm_bias")]
        return {
            "pooler_output": lambda: Readout(stream, pooled, Tap(vision.post_layernorm)),
            PATCH_MEAN: lambda: patch_mean_readout(stream, None, 1),
        }


class HFCLIPVisionProjectionAdapter(HFCLIPVisionAdapter):
    family = "hf-clip-projection"
    tower = _clip_tower("vision_model.")

    def vision(self, model: nn.Module) -> nn.Module:
        return model.vision_model

    def readouts(self, model: nn.Module) -> dict[str, Callable[[], Readout]]:
        inner = super().readouts(model)
        pooled, proj = inner["pooler_output"], model.visual_projection

        def image_embeds() -> Readout:
            base = pooled()
            return Readout(base.stream, [*base.steps, Linear(proj.weight, proj.bias, "proj_bias")], Tap(proj))

        return {"image_embeds": image_embeds, "vision_model.pooler_output": pooled, PATCH_MEAN: inner[PATCH_MEAN]}


class HFSiglipVisionAdapter(HFTowerAdapter):
    family = "hf-siglip"
    tower = _clip_tower(family="Siglip")

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return 0

    def readouts(self, model: nn.Module) -> dict[str, Callable[[], Readout]]:
        stream, norm = Tap(model.encoder.layers[-1]), model.post_layernorm
        out = {PATCH_MEAN: lambda: patch_mean_readout(stream, norm, 0)}
        if not model.use_head:
            return out
        head = model.head

        def pooled() -> Readout:
            return Readout(stream, [TokenNorm(norm), MultiheadPool(head.attention, mlp=head.mlp)], Tap(head))

        return {"pooler_output": pooled, **out}
