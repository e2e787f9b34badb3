"""What the zoo's trainings optimise: one :class:`Objective` per kind of training, and distillation
from a trained zoo model (the teacher) that the supervised and CLIP objectives can add.

Every objective has the same interface: built from the recipe, the fresh model, its config and the
training scenes, it holds its training-only modules (``modules``, dropped after training), gives a
batch's loss (:meth:`Objective.loss`), and checks the model after an epoch (:meth:`Objective.validate`).

* :class:`Supervised` — one cross-entropy per core attribute over its slice of the logits.
* :class:`SimCLR` — InfoNCE (NT-Xent) between two generator-rendered views of each scene.
* :class:`ClipContrastive` — open_clip's symmetric image-caption loss, a new phrasing every epoch.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitdecomp.world.attributes import ATTRIBUTES
from vitdecomp.world.captions import N_TEMPLATES, caption
from vitdecomp.world.scenes import make_scenes
from vitdecomp.zoo.data import flip, gray, labels_of, normalize, to_tensor
from vitdecomp.zoo.evaluate import clip_zero_shot, multi_attribute_accuracy
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


class SimCLR(Objective):
    """The second view of a scene is the same object (same shape, colour, pattern, background, size
    class) rendered again by the generator with a new position, rotation, radius, texture and noise,
    plus flips (and grey with ``recipe.gray_p``); the projection head is dropped after training."""

    summary = "self-supervised SimCLR-style InfoNCE between two generator-rendered views of the same object"
    distillable = False

    def __init__(self, recipe: Recipe, model: nn.Module, config: dict[str, Any], scenes) -> None:
        super().__init__(recipe, model, config, scenes)
        fixed = {k: scenes.attributes[k] for k in ATTRIBUTES}
        alt = make_scenes(recipe.n_train, seed=recipe.data_seed + 1, size=IMAGE_SIZE, fixed=fixed)
        self.x_alt = to_tensor(alt.images)
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
OBJECTIVES: dict[str, type[Objective]] = {"supervised": Supervised, "simclr": SimCLR, "clip": ClipContrastive}


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
