"""How each zoo model is trained (:data:`RECIPES`): plain data that the trainer, the cards and the
resume check read. The objectives themselves are in :mod:`vitdecomp.zoo.objectives`."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Recipe:
    objective: str  # a key of vitdecomp.zoo.objectives.OBJECTIVES: supervised, planted, simclr, dino, clip
    epochs: int
    n_train: int = 30000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 200
    seed: int = 0
    data_seed: int = 1000
    temperature: float = 0.2  # simclr
    gray_p: float = 0.0  # simclr: probability that a view is turned to grey (SimCLR's random grayscale)
    distill_from: str | None = None  # zoo model distilled from (trained first)
    distill_weight: float = 1.0  # cosine distillation of the teacher's representation (0: off)
    kd_weight: float = 0.0  # soft-label distillation of the teacher's per-attribute logits (0: off)
    kd_temperature: float = 2.0
    # simclr: batches made of runs of ``group_size`` scenes sharing the attributes of one of these
    # groupings (each epoch's scenes are split evenly between the groupings)
    group_by: tuple[tuple[str, ...], ...] = ()
    group_size: int = 32
    # planted: {attribute: [head labels]} — the heads made to carry each attribute through their direct
    # contribution; every other head and MLP, and each planted head for the other attributes, is made
    # invariant to it (see vitdecomp.zoo.objectives.Planted)
    planted: dict[str, list[str]] = field(default_factory=dict)
    planted_weight: float = 1.0  # cross-entropy of the per-component probes of the planted pairs
    invariance_weight: float = 0.5  # between-class / total variance of the other pairs' contributions
    adversary_weight: float = 0.5  # the other pairs' adversary probes' cross-entropy to uniform (0: off)
    # dino: head (prototypes, hidden width, bottleneck), temperatures (the teacher's warmed up linearly from
    # ``_start`` over ``dino_teacher_warmup_epochs``), centre and teacher momenta, views (renderings of the
    # object by the generator; global crops' area share; local crops' half-side in object radii)
    dino_prototypes: int = 1024
    dino_hidden: int = 256
    dino_bottleneck: int = 64
    dino_head_bn: bool = False  # BatchNorm after the head's hidden layers (DINO's use_bn_in_head)
    dino_student_temperature: float = 0.1
    dino_teacher_temperature: float = 0.07
    dino_teacher_temperature_start: float = 0.04
    dino_teacher_warmup_epochs: float = 1.0
    dino_center_momentum: float = 0.9
    dino_teacher_momentum: float = 0.99  # start of the cosine schedule to 1
    dino_renders: int = 1
    dino_local_crops: int = 2
    dino_global_scale: tuple[float, float] = (0.5, 1.0)
    dino_local_zoom: tuple[float, float] = (1.2, 2.0)
    dino_local_backgrounds: str = "same"  # "new": local crops of the object rendered on a random background


#: The roles planted in ``zoo:planted`` (labels as ``vitdecomp.decompose`` names its components).
PLANTED_MAP: dict[str, list[str]] = {
    "color": ["L1.H1", "L3.H0"],
    "shape": ["L3.H2", "L4.H1", "L4.H3"],
    "pattern": ["L2.H3", "L4.H0"],
    "background": ["L1.H2", "L3.H3"],
}


RECIPES: dict[str, Recipe] = {
    "deit": Recipe("supervised", epochs=6),
    "swin": Recipe("supervised", epochs=12, distill_from="deit", kd_weight=1.0),
    "maxvit": Recipe("supervised", epochs=8, n_train=20000),
    "simclr": Recipe(
        "simclr",
        epochs=6,
        n_train=20000,
        batch_size=256,
        temperature=0.1,
        gray_p=0.0,
        group_by=(("color", "background"), ("shape", "background")),
        group_size=32,
    ),
    "planted": Recipe("planted", epochs=6, planted=PLANTED_MAP),
    "clip": Recipe("clip", epochs=4, lr=5e-4, distill_from="deit", kd_weight=1.0),
}
