"""What the zoo's trainings optimise: one :class:`Objective` per kind of training, and distillation
from a trained zoo model (the teacher) that the supervised and CLIP objectives can add.

Every objective has the same interface: built from the recipe, the fresh model, its config and the
training scenes, it holds its training-only modules (``modules``, dropped after training), gives a
batch's loss (:meth:`Objective.loss`), and checks the model after an epoch (:meth:`Objective.validate`).

* :class:`Supervised` — one cross-entropy per core attribute over its slice of the logits.
* :class:`Planted` — the supervised loss plus planted roles: per-component linear probes on the
  direct contributions make designated heads carry designated attributes, and a variance penalty
  with gradient-reversed probes makes every other head and MLP invariant to them.
* :class:`SimCLR` — InfoNCE (NT-Xent) between two generator-rendered views of each scene.
* :class:`Dino` — DINO's self-distillation: an EMA teacher's centred, sharpened prototype
  distribution over two global crops is the target of the student's over every crop (multi-crop).
* :class:`ClipContrastive` — open_clip's symmetric image-caption loss, a new phrasing every epoch.
"""

from __future__ import annotations

import copy
import math
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitdecomp.world.attributes import ATTRIBUTES, CORE_ATTRIBUTES
from vitdecomp.world.captions import N_TEMPLATES, caption
from vitdecomp.world.scenes import make_scenes
from vitdecomp.zoo.data import flip, gray, labels_of, normalize, to_tensor
from vitdecomp.zoo.evaluate import clip_zero_shot, linear_probe, multi_attribute_accuracy
from vitdecomp.zoo.models import HEAD_SIZES, IMAGE_SIZE, NUM_LOGITS, clip_tokenizer
from vitdecomp.zoo.recipes import Recipe

#: Scenes checked after each epoch (seed ``data_seed + VALIDATION_SEED_OFFSET``).
N_VALIDATION = 512
VALIDATION_SEED_OFFSET = 500

# ----------------------------------------------------------------------------------------------
# losses


def multi_attribute_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over the core attributes of the cross-entropy of each attribute's slice of the logits."""
    loss = logits.new_zeros(())
    for i, part in enumerate(torch.split(logits, list(HEAD_SIZES.values()), dim=1)):
        loss = loss + F.cross_entropy(part, y[:, i])
    return loss / len(HEAD_SIZES)


def soft_label_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's soft-target loss, T² · KL(teacher_T || student_T), averaged over the attributes' slices."""
    sizes = list(HEAD_SIZES.values())
    loss = student.new_zeros(())
    for s, t in zip(torch.split(student, sizes, 1), torch.split(teacher, sizes, 1), strict=True):
        loss = loss + F.kl_div(
            F.log_softmax(s / temperature, 1), F.log_softmax(t / temperature, 1), log_target=True, reduction="batchmean"
        )
    return loss * temperature**2 / len(sizes)


def nt_xent(za: torch.Tensor, zb: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalised-temperature cross-entropy over 2B views."""
    z = F.normalize(torch.cat([za, zb]), dim=1)
    sim = z @ z.t() / temperature
    b = za.shape[0]
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)])
    return F.cross_entropy(sim, target)


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """open_clip's symmetric contrastive loss between matching image and text embeddings."""
    img = F.normalize(img, dim=-1)
    txt = F.normalize(txt, dim=-1)
    logits = logit_scale.exp() * img @ txt.t()
    target = torch.arange(len(img))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


# ----------------------------------------------------------------------------------------------
# objectives

#: What a batch's loss gives back: the loss, and for distillation the student's representation
#: [B, width] and multi-attribute logits [B, NUM_LOGITS] (None where the objective has none).
BatchLoss = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]


class Objective:
    """One kind of training (see the module's docstring for the interface)."""

    #: One line for the card: what the objective optimises.
    summary: ClassVar[str] = ""
    #: Whether the model's own head gives the multi-attribute logits (else soft-label distillation
    #: reads them from a training-only head on the representation).
    own_logits: ClassVar[bool] = True
    #: Whether :meth:`loss` gives a representation that distillation can read.
    distillable: ClassVar[bool] = True

    def __init__(self, recipe: Recipe, model: nn.Module, config: dict[str, Any], scenes) -> None:
        self.recipe, self.model, self.scenes = recipe, model, scenes
        self.modules = nn.ModuleDict()
        self.val: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def describe(cls, recipe: Recipe) -> str:
        return cls.summary

    def width(self) -> int:
        """Width of the representation that distillation maps onto the teacher's."""
        return getattr(self.model, "head_hidden_size", None) or self.model.num_features

    def start_epoch(self) -> None:
        """Called before each epoch."""

    def loss(self, idx: torch.Tensor, xb: torch.Tensor, g: torch.Generator) -> BatchLoss:
        """The loss of the batch ``idx`` (scene indices) whose flipped uint8 images are ``xb``."""
        raise NotImplementedError

    def after_step(self) -> None:
        """Called after each optimiser step."""

    def finish(self) -> None:
        """Called once after the last epoch, before the model is saved."""

    def validate(self) -> dict[str, float] | None:
        """Per-attribute accuracy on the validation scenes after an epoch (None: no check)."""
        if self.val is None:
            return None
        self.model.eval()
        with torch.no_grad():
            acc = self.accuracy(*self.val)
        self.model.train()
        return acc

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        raise NotImplementedError

    def diagnostics(self) -> dict[str, float] | None:
        """Figures of the training's own state after an epoch, for the card's history (None: none)."""
        return None

    def _validation_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        vs = make_scenes(N_VALIDATION, seed=self.recipe.data_seed + VALIDATION_SEED_OFFSET, size=IMAGE_SIZE)
        return to_tensor(vs.images), labels_of(vs)


class Supervised(Objective):
    summary = "supervised multi-attribute classification (shape, color, pattern, background heads)"

    def __init__(self, recipe: Recipe, model: nn.Module, config: dict[str, Any], scenes) -> None:
        super().__init__(recipe, model, config, scenes)
        self.y = labels_of(scenes)
        self.val = self._validation_set()

    def loss(self, idx: torch.Tensor, xb: torch.Tensor, g: torch.Generator) -> BatchLoss:
        feats = self.model.forward_features(normalize(xb))
        rep = self.model.forward_head(feats, pre_logits=True)
        logits = self.model.forward_head(feats)
        return multi_attribute_loss(logits, self.y[idx]), rep, logits

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        return multi_attribute_accuracy(self.model(normalize(x)), y)


def direct_labels(model: nn.Module) -> list[str]:
    """The labels of a timm ViT's direct branches as :func:`vitdecomp.decompose` names them: every
    head ``L<l>.H<h>`` then the layer's ``L<l>.mlp``."""
    out = []
    for i, blk in enumerate(model.blocks):
        out += [f"L{i}.H{h}" for h in range(blk.attn.num_heads)] + [f"L{i}.mlp"]
    return out


def direct_contributions(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A timm ViT's logits ``[B, NUM_LOGITS]`` and the direct contributions of its branches to the
    class-token representation ``[B, M, D]`` (order of :func:`direct_labels`): each head's output at the
    class token through its slice of ``attn.proj`` (no bias) and each MLP's output there, read through
    the final norm with its statistics frozen (centred, divided by the stream's std, times gamma) —
    what :func:`vitdecomp.decompose` gives for those components (the MLP's up to its constant bias)."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [model.norm.register_forward_pre_hook(lambda m, a: seen.__setitem__("norm", a[0][:, 0]))]
    for i, blk in enumerate(model.blocks):
        hooks.append(blk.attn.proj.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(f"a{i}", a[0][:, 0])))
        hooks.append(blk.mlp.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(f"m{i}", out[:, 0])))
    try:
        logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    parts = []
    for i, blk in enumerate(model.blocks):
        heads, w = blk.attn.num_heads, blk.attn.proj.weight  # [D, H * dh]
        u = seen[f"a{i}"].view(len(x), heads, -1)  # [B, H, dh]
        parts += [torch.einsum("bhd,ohd->bho", u, w.view(w.shape[0], heads, -1)), seen[f"m{i}"][:, None]]
    c = torch.cat(parts, 1)  # [B, M, D]
    stream = seen["norm"]
    sigma = (stream.var(-1, unbiased=False) + model.norm.eps).sqrt().detach()
    return logits, (c - c.mean(-1, keepdim=True)) / sigma[:, None, None] * model.norm.weight


def between_class_share(z: torch.Tensor, y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Share of each component's variance explained by the class means, per dimension, averaged over
    the dimensions (each dimension counts alike, as for a probe on standardised features):
    ``z [B, M, D]``, labels ``y [B]`` -> ``[M]`` in [0, 1] (0: every class has the same mean)."""
    onehot = F.one_hot(y, n_classes).to(z.dtype)  # [B, K]
    counts = onehot.sum(0)  # [K]
    mu = z.mean(0)  # [M, D]
    means = torch.einsum("bk,bmd->kmd", onehot, z) / counts.clamp_min(1)[:, None, None]
    between = (counts[:, None, None] / len(z) * (means - mu) ** 2).sum(0)  # [M, D]
    total = ((z - mu) ** 2).mean(0)  # [M, D]
    return (between / (total + 1e-3 * total.mean(-1, keepdim=True) + 1e-12)).mean(-1)


def standardise(z: torch.Tensor) -> torch.Tensor:
    """``z [B, M, D]`` centred and scaled per component and dimension by the batch's statistics
    (detached: the gradient passes as through a fixed affine map)."""
    mu, sd = z.mean(0).detach(), z.std(0).detach()
    return (z - mu) / (sd + 1e-3 * sd.mean(-1, keepdim=True) + 1e-12)


class Planted(Supervised):
    """The supervised loss plus planted roles (``recipe.planted``, ``{attribute: [head labels]}``): for
    every direct branch (head or MLP) and core attribute, a training-only linear probe reads the branch's
    direct contribution (:func:`direct_contributions`, standardised over the batch). A planted pair adds
    its probe's cross-entropy (``planted_weight``, averaged over the planted pairs), so the head carries
    the attribute linearly.
    Every other pair's probe learns to decode the attribute from the detached contribution (an
    adversary), and the branch is pushed to make it unable to: the cross-entropy of the adversary's
    prediction to the uniform distribution (``adversary_weight``; bounded, unlike a gradient reversal)
    plus the share of the contribution's variance explained by the attribute's class means, per
    dimension (``invariance_weight``), both summed over the branches, averaged over the attributes and ramped
    in linearly over the warm-up steps."""

    summary = "supervised multi-attribute classification with planted roles"
    distillable = False

    def __init__(self, recipe: Recipe, model: nn.Module, config: dict[str, Any], scenes) -> None:
        super().__init__(recipe, model, config, scenes)
        self.labels = direct_labels(model)
        unknown = sorted({h for heads in recipe.planted.values() for h in heads} - set(self.labels))
        if unknown or not set(recipe.planted) <= set(CORE_ATTRIBUTES):
            raise ValueError(f"planted map names unknown heads {unknown} or attributes {sorted(recipe.planted)}")
        # mask [M, A]: whether component m carries attribute a
        self.mask = torch.tensor([[lab in recipe.planted.get(a, []) for a in CORE_ATTRIBUTES] for lab in self.labels])
        m, d = len(self.labels), model.embed_dim
        self.modules["probe_weight"] = nn.ParameterList([nn.Parameter(torch.zeros(m, d, NUM_LOGITS))])
        self.modules["probe_bias"] = nn.ParameterList([nn.Parameter(torch.zeros(m, NUM_LOGITS))])
        self.step = 0

    @classmethod
    def describe(cls, recipe: Recipe) -> str:
        roles = "; ".join(f"{a}: {', '.join(h)}" for a, h in recipe.planted.items())
        return cls.summary + f" ({roles}; every other head and MLP made invariant to these attributes)"

    def probe_logits(self, z: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        """Every component's probe logits ``[B, M, NUM_LOGITS]`` from ``z [B, M, D]`` (``frozen``: the
        probes' parameters detached, so the gradient reaches only ``z``)."""
        w, b = self.modules["probe_weight"][0], self.modules["probe_bias"][0]
        if frozen:
            w, b = w.detach(), b.detach()
        return torch.einsum("bmd,mdk->bmk", z, w) + b

    def loss(self, idx: torch.Tensor, xb: torch.Tensor, g: torch.Generator) -> BatchLoss:
        r, y = self.recipe, self.y[idx]
        logits, z = direct_contributions(self.model, normalize(xb))
        sizes = list(HEAD_SIZES.values())
        zs = standardise(z)  # the probes read standardised contributions, as a held-out probe does
        carried = torch.split(self.probe_logits(zs), sizes, -1)  # planted pairs: the gradient reaches z
        adversaries = torch.split(self.probe_logits(zs.detach()), sizes, -1)  # other pairs: the probes only
        frozen = torch.split(self.probe_logits(zs, frozen=True), sizes, -1)  # other pairs: z only
        planted, adversary, confusion, invariance = [], [], [], []
        for a, (carry, adv, attacked) in enumerate(zip(carried, adversaries, frozen, strict=True)):
            keep = self.mask[:, a]  # [M]
            part = torch.where(keep[None, :, None], carry, adv)
            target = y[:, a, None].expand(-1, part.shape[1])  # [B, M]
            ce = F.cross_entropy(part.transpose(1, 2), target, reduction="none").mean(0)  # [M]
            planted.append(ce[keep])
            adversary.append(ce[~keep])
            confusion.append(-F.log_softmax(attacked[:, ~keep], -1).mean((0, 2)))
            invariance.append(between_class_share(z[:, ~keep], y[:, a], part.shape[-1]))
        n, ramp = len(CORE_ATTRIBUTES), min(1.0, (self.step + 1) / max(1, r.warmup_steps))
        loss = multi_attribute_loss(logits, y) + r.planted_weight * torch.cat(planted).mean()
        loss = loss + torch.cat(adversary).sum() / n  # trains the adversaries only (their input is detached)
        other = r.adversary_weight * torch.cat(confusion).sum() + r.invariance_weight * torch.cat(invariance).sum()
        return loss + ramp * other / n, None, logits

    def after_step(self) -> None:
        self.step += 1

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Task accuracy per attribute, and the online probes' accuracy: the worst planted pair's
        (``planted_min``) and the best other pair's (``others_max``)."""
        logits, z = direct_contributions(self.model, normalize(x))
        acc = multi_attribute_accuracy(logits, y)
        parts = torch.split(self.probe_logits(standardise(z)), list(HEAD_SIZES.values()), -1)
        per = torch.stack([(p.argmax(-1) == y[:, a, None]).float().mean(0) for a, p in enumerate(parts)], 1)
        acc["planted_min"] = per[self.mask].min().item() if self.mask.any() else float("nan")
        acc["others_max"] = per[~self.mask].max().item()
        return acc


def rerender(recipe: Recipe, scenes, k: int = 1, background: bool = True):
    """Every training scene's object (same shape, colour, pattern, size class, and background unless
    ``background=False``, when the generator draws a new one) rendered again by the generator (seed
    ``data_seed + k``) with a new position, rotation, radius, background texture phase and noise: the
    other views of the self-supervised objectives (``Scenes``)."""
    fixed = {a: scenes.attributes[a] for a in ATTRIBUTES if background or a != "background"}
    return make_scenes(recipe.n_train, seed=recipe.data_seed + k, size=IMAGE_SIZE, fixed=fixed)


class SimCLR(Objective):
    """The second view of a scene is the same object (same shape, colour, pattern, background, size
    class) rendered again by the generator with a new position, rotation, radius, texture and noise,
    plus flips (and grey with ``recipe.gray_p``); the projection head is dropped after training."""

    summary = "self-supervised SimCLR-style InfoNCE between two generator-rendered views of the same object"
    distillable = False

    def __init__(self, recipe: Recipe, model: nn.Module, config: dict[str, Any], scenes) -> None:
        super().__init__(recipe, model, config, scenes)
        self.x_alt = to_tensor(rerender(recipe, scenes).images)
        d = model.embed_dim
        self.modules["proj"] = nn.Sequential(nn.Linear(d, 256), nn.GELU(), nn.Linear(256, 128))

    @classmethod
    def describe(cls, recipe: Recipe) -> str:
        if not recipe.group_by:
            return cls.summary
        shared = " or ".join("+".join(grouping) for grouping in recipe.group_by)
        return cls.summary + f" (batches of runs of {recipe.group_size} scenes sharing {shared})"

    def loss(self, idx: torch.Tensor, xb: torch.Tensor, g: torch.Generator) -> BatchLoss:
        xa = flip(self.x_alt[idx], g)
        if self.recipe.gray_p > 0:
            xb, xa = gray(xb, self.recipe.gray_p, g), gray(xa, self.recipe.gray_p, g)
        proj = self.modules["proj"]
        za = proj(self.model(normalize(xb)))
        zb = proj(self.model(normalize(xa)))
        return nt_xent(za, zb, self.recipe.temperature), None, None


def object_geometry(scenes) -> torch.Tensor:
    """``[N, 3]``: each scene's object centre (x, y) and radius in the ``[-1, 1]`` image coordinates of
    ``F.affine_grid`` (the generator's geometry, not its attributes)."""
    a, s = scenes.attributes, scenes.size
    return torch.from_numpy(np.stack([a["cx"] / s * 2 - 1, a["cy"] / s * 2 - 1, a["radius"] / s * 2], 1)).float()


def object_crops(
    x: torch.Tensor, obj: torch.Tensor, half: torch.Tensor, g: torch.Generator, size: int = IMAGE_SIZE
) -> torch.Tensor:
    """Square crops of half-side ``half [B]`` (image half-side = 1) that keep the object ``obj [B, 3]``
    (centre, radius) inside where the crop is larger than the object, placed at random otherwise within
    the image, resized to ``size`` (bilinear, border padding): ``[B, 3, H, W] -> [B, 3, size, size]``."""
    b = x.shape[0]
    free = (1 - half).clamp_min(0)[:, None]  # the crop's centre stays within [-free, free]
    centre = (torch.rand(b, 2, generator=g) * 2 - 1) * free
    slack = (half[:, None] - obj[:, 2:]).clamp_min(0)  # how far the centre may sit from the object's
    centre = torch.maximum(torch.minimum(centre, obj[:, :2] + slack), obj[:, :2] - slack)
    zero = torch.zeros(b)
    theta = torch.stack(
        [torch.stack([half, zero, centre[:, 0]], 1), torch.stack([zero, half, centre[:, 1]], 1)], 1
    )  # [B, 2, 3]
    grid = F.affine_grid(theta, [b, 3, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def probe_halves(f: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Per core attribute, the accuracy of a linear probe (:func:`linear_probe`) fitted on the first half
    of the features ``f [N, D]`` and scored on the second; labels ``y [N, A]``."""
    h = len(f) // 2
    return {k: linear_probe(f[:h], y[:h, a], f[h:], y[h:, a]) for a, k in enumerate(HEAD_SIZES)}


class DinoHead(nn.Module):
    """DINO's projection head: a 3-layer MLP to a bottleneck (with BatchNorm after the hidden layers when
    ``bn``, DINO's ``use_bn_in_head``), L2-normalised, then a weight-normalised linear layer (its norm
    fixed to 1) onto the prototypes: ``[B, D] -> [B, prototypes]``."""

    def __init__(self, dim: int, prototypes: int, hidden: int = 256, bottleneck: int = 64, bn: bool = False) -> None:
        super().__init__()
        norm = nn.BatchNorm1d if bn else nn.Identity
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden),
            norm(hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            norm(hidden),
            nn.GELU(),
            nn.Linear(hidden, bottleneck),
        )
        self.last = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck, prototypes, bias=False))
        self.last.parametrizations.weight.original0.data.fill_(1.0)
        self.last.parametrizations.weight.original0.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(F.normalize(self.mlp(x), dim=-1))


def dino_loss(student: torch.Tensor, teacher: torch.Tensor, n_global: int, temperature: float) -> torch.Tensor:
    """Cross-entropy of the student's prototype distributions (``student [V, B, K]`` logits, the first
    ``n_global`` views global) to the teacher's (``teacher [n_global, B, K]`` probabilities), averaged
    over every pair of a teacher view and a different student view."""
    log_p = F.log_softmax(student / temperature, dim=-1)
    terms = [-(teacher[i] * log_p[j]).sum(-1).mean() for i in range(n_global) for j in range(len(student)) if j != i]
    return torch.stack(terms).mean()


class Dino(Objective):
    """DINO (Caron et al. 2021) on the world. The views of a scene come from its image and from
    ``dino_renders`` renderings of the same object by the generator (same shape, colour, pattern,
    background and size class; new position, rotation, radius, background texture phase and noise):
    view ``v`` is cropped from source ``v mod (1 + dino_renders)``. The two global views are square crops
    of ``dino_global_scale`` of the image area that keep the object inside; the ``dino_local_crops``
    local views square crops around the object, ``dino_local_zoom`` times its radius (half-side), so that
    every view shows the object (crops that miss it leave only the background to agree on). All resized
    to the model's input, flipped at random; no colour augmentation (colour is an attribute to keep).
    The teacher (backbone and head) is an EMA of the student (momentum from ``dino_teacher_momentum`` to 1,
    cosine); its outputs are centred (EMA of their batch mean) and sharpened (temperature from
    ``dino_teacher_temperature_start`` to ``dino_teacher_temperature`` over ``dino_teacher_warmup_epochs``).
    The teacher's backbone is kept."""

    summary = "self-supervised DINO self-distillation (EMA teacher, centring, sharpening, multi-crop)"
    distillable = False

    def __init__(self, recipe: Recipe, model: nn.Module, config: dict[str, Any], scenes) -> None:
        super().__init__(recipe, model, config, scenes)
        r = recipe
        renders = [scenes] + [rerender(r, scenes, k + 1) for k in range(r.dino_renders)]
        if r.dino_local_backgrounds == "new":  # one rendering on a background drawn anew per local crop
            n = 1 + r.dino_renders
            renders += [rerender(r, scenes, n + k, background=False) for k in range(r.dino_local_crops)]
        self.sources = [to_tensor(s.images) for s in renders]  # uint8 [N, 3, H, W] each
        self.geometry = [object_geometry(s) for s in renders]  # [N, 3] each
        self.modules["head"] = DinoHead(
            model.embed_dim, r.dino_prototypes, r.dino_hidden, r.dino_bottleneck, r.dino_head_bn
        )
        self.teacher = nn.ModuleDict({"backbone": copy.deepcopy(model), "head": copy.deepcopy(self.modules["head"])})
        self.teacher.requires_grad_(False).eval()
        self.center = torch.zeros(recipe.dino_prototypes)
        self.steps_per_epoch = max(1, recipe.n_train // recipe.batch_size)
        self.step, self.total = 0, self.steps_per_epoch * recipe.epochs
        self.val = self._validation_set()

    def teacher_temperature(self) -> float:
        """The teacher's temperature at the current step: linear warm-up, then constant."""
        r = self.recipe
        warm = r.dino_teacher_warmup_epochs * self.steps_per_epoch
        f = min(1.0, self.step / warm) if warm else 1.0
        return r.dino_teacher_temperature_start + f * (r.dino_teacher_temperature - r.dino_teacher_temperature_start)

    def views(self, idx: torch.Tensor, g: torch.Generator) -> list[torch.Tensor]:
        """Two global views then ``dino_local_crops`` local ones, each normalised ``[B, 3, H, W]``."""
        r, b, out = self.recipe, len(idx), []
        n = 1 + r.dino_renders  # the sources that keep the scene's background
        for v in range(2 + r.dino_local_crops):
            s = n + v - 2 if v >= 2 and r.dino_local_backgrounds == "new" else v % n
            obj = self.geometry[s][idx]
            if v < 2:
                half = torch.empty(b).uniform_(*r.dino_global_scale, generator=g).sqrt()
            else:
                half = torch.empty(b).uniform_(*r.dino_local_zoom, generator=g) * obj[:, 2]
            out.append(flip(object_crops(normalize(self.sources[s][idx]), obj, half, g), g))
        return out

    def teacher_probabilities(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's prototype logits ``[B, K]`` and its centred, sharpened distribution ``[B, K]``."""
        t = self.teacher["head"](self.teacher["backbone"](x))
        return t, F.softmax((t - self.center) / self.teacher_temperature(), dim=-1)

    def loss(self, idx: torch.Tensor, xb: torch.Tensor, g: torch.Generator) -> BatchLoss:
        """(``xb`` is not read: the views are cropped from the unflipped sources, then flipped.)"""
        r = self.recipe
        views = self.views(idx, g)
        b = len(idx)
        student = self.modules["head"](self.model(torch.cat(views))).view(len(views), b, -1)
        with torch.no_grad():
            t, target = self.teacher_probabilities(torch.cat(views[:2]))
            m = r.dino_center_momentum
            self.center = m * self.center + (1 - m) * t.mean(0)
        return dino_loss(student, target.view(2, b, -1), 2, r.dino_student_temperature), None, None

    @torch.no_grad()
    def after_step(self) -> None:
        """EMA update of the teacher's parameters; its buffers (BatchNorm statistics) are copied."""
        self.step += 1
        base = self.recipe.dino_teacher_momentum
        m = 1 - (1 - base) * (math.cos(math.pi * min(self.step, self.total) / self.total) + 1) / 2
        student = nn.ModuleDict({"backbone": self.model, "head": self.modules["head"]})
        for ps, pt in zip(student.parameters(), self.teacher.parameters(), strict=True):
            pt.mul_(m).add_(ps.detach(), alpha=1 - m)
        for bs, bt in zip(student.buffers(), self.teacher.buffers(), strict=True):
            bt.copy_(bs)

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Held-out linear-probe accuracy per attribute of the teacher's representation (the kept
        model): fitted on the first half of the validation scenes, scored on the second."""
        return probe_halves(self.teacher["backbone"](normalize(x)), y)

    @torch.no_grad()
    def diagnostics(self) -> dict[str, float]:
        """Collapse checks on the validation scenes (DINO paper, section 5.3): the teacher's mean
        entropy (0: one-hot targets, sharpening dominates), the KL divergence from its mean distribution
        to the uniform one (0: every prototype used alike; log K: one prototype for every image), the
        prototypes that are some image's argmax, the centre's norm and the teacher's temperature."""
        x, y = self.val
        self.model.eval()
        student = probe_halves(self.model(normalize(x)), y)
        self.model.train()
        p = self.teacher_probabilities(normalize(x))[1]
        entropy = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
        mean = p.mean(0)
        kl = (mean * (mean.clamp_min(1e-12) * len(mean)).log()).sum()
        return {
            "teacher_entropy": entropy.item(),
            "kl_to_uniform": kl.item(),
            "prototypes_used": float(len(p.argmax(-1).unique())),
            "center_norm": self.center.norm().item(),
            "teacher_temperature": self.teacher_temperature(),
            **{f"student_{k}": v for k, v in student.items()},
        }

    def finish(self) -> None:
        """The teacher's backbone becomes the model (DINO evaluates and keeps the teacher)."""
        self.model.load_state_dict(self.teacher["backbone"].state_dict())


class ClipContrastive(Objective):
    """Each epoch pairs every scene with a newly drawn phrasing of its caption; validation is
    zero-shot accuracy with the world's prompts."""

    summary = "CLIP contrastive image-caption loss"
    own_logits = False

    def __init__(self, recipe: Recipe, model: nn.Module, config: dict[str, Any], scenes) -> None:
        super().__init__(recipe, model, config, scenes)
        self.tokenizer = clip_tokenizer(config["text_cfg"]["context_length"])
        self.embed_dim = config["embed_dim"]
        self.val = self._validation_set()
        self.caption_rng = np.random.default_rng(recipe.seed + 7)
        self._token_cache: dict[str, torch.Tensor] = {}
        self.tokens: torch.Tensor | None = None

    def width(self) -> int:
        return self.embed_dim

    def start_epoch(self) -> None:
        n = self.recipe.n_train
        choices = self.caption_rng.integers(0, N_TEMPLATES * 3, n)
        attrs = self.scenes.attributes
        texts = [caption({k: int(attrs[k][i]) for k in ATTRIBUTES}, int(choices[i])) for i in range(n)]
        missing = sorted({t for t in texts if t not in self._token_cache})
        if missing:
            for t, tok in zip(missing, self.tokenizer(missing), strict=True):
                self._token_cache[t] = tok
        self.tokens = torch.stack([self._token_cache[t] for t in texts])

    def loss(self, idx: torch.Tensor, xb: torch.Tensor, g: torch.Generator) -> BatchLoss:
        rep = self.model.encode_image(normalize(xb, clip=True))
        txt = self.model.encode_text(self.tokens[idx])
        return clip_loss(rep, txt, self.model.logit_scale), rep, None

    def after_step(self) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        img = self.model.encode_image(normalize(x, clip=True))
        return clip_zero_shot(self.model, self.tokenizer, img, y)


#: The objectives by ``Recipe.objective``.
OBJECTIVES: dict[str, type[Objective]] = {
    "supervised": Supervised,
    "planted": Planted,
    "simclr": SimCLR,
    "dino": Dino,
    "clip": ClipContrastive,
}


# ----------------------------------------------------------------------------------------------
# distillation


def teacher_outputs(teacher: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's representation [B, D] and its multi-attribute logits [B, NUM_LOGITS]."""
    feats = teacher.forward_features(x)
    return teacher.forward_head(feats, pre_logits=True), teacher.forward_head(feats)


class Distillation:
    """Distillation from a trained zoo model (as DeiT distilled from a teacher): a cosine loss
    between a training-only linear map of the student's representation and the teacher's
    (``recipe.distill_weight``), and Hinton's soft-label loss on each attribute's logits
    (``recipe.kd_weight``) — the student's own logits, or those of a training-only linear head on
    its representation when the objective has none (``Objective.own_logits``)."""

    def __init__(self, recipe: Recipe, teacher: nn.Module, objective: Objective, probe: torch.Tensor) -> None:
        """``probe``: a few uint8 images, to read the teacher's width."""
        if not objective.distillable:
            raise ValueError(f"the {recipe.objective!r} objective does not take distillation")
        self.recipe, self.teacher = recipe, teacher
        teacher.eval()
        with torch.no_grad():
            teacher_width = teacher_outputs(teacher, normalize(probe))[0].shape[1]
        width = objective.width()
        self.modules = nn.ModuleDict()
        if recipe.distill_weight:
            self.modules["distill"] = nn.Linear(width, teacher_width)
        if recipe.kd_weight and not objective.own_logits:
            self.modules["kd_head"] = nn.Linear(width, NUM_LOGITS)

    def targets(self, xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's outputs on a batch of uint8 images (its own pixel scaling)."""
        with torch.no_grad():
            return teacher_outputs(self.teacher, normalize(xb))

    def add_loss(self, loss: torch.Tensor, targets, rep: torch.Tensor | None, logits: torch.Tensor | None):
        """``loss`` plus the distillation terms for the student's representation and logits."""
        r = self.recipe
        if r.distill_weight:
            sf = self.modules["distill"](rep)
            loss = loss + r.distill_weight * (1 - F.cosine_similarity(sf, targets[0], dim=1)).mean()
        if r.kd_weight:
            if "kd_head" in self.modules:
                logits = self.modules["kd_head"](rep)
            loss = loss + r.kd_weight * soft_label_loss(logits, targets[1], r.kd_temperature)
        return loss


def objective_text(recipe: Recipe) -> str:
    """One line saying what the recipe optimises."""
    text = OBJECTIVES[recipe.objective].describe(recipe)
    if recipe.distill_from and recipe.distill_weight:
        text += f" + cosine distillation of zoo:{recipe.distill_from}'s representation"
    if recipe.distill_from and recipe.kd_weight:
        text += f" + soft-label distillation of zoo:{recipe.distill_from}'s logits (T={recipe.kd_temperature:g})"
    return text
