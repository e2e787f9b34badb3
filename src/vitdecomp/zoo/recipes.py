"""How each zoo model is trained (:data:`RECIPES`): plain data that the trainer, the cards and the
resume check read. The objectives themselves are in :mod:`vitdecomp.zoo.objectives`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Recipe:
    objective: str  # a key of vitdecomp.zoo.objectives.OBJECTIVES: "supervised" | "simclr" | "clip"
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


RECIPES: dict[str, Recipe] = {
    "deit": Recipe("supervised", epochs=6),
    "swin": Recipe("supervised", epochs=12, distill_from="deit", kd_weight=1.0),
    "maxvit": Recipe("supervised", epochs=8, n_train=20000),
    "dino": Recipe(
        "simclr",
        epochs=6,
        n_train=20000,
        batch_size=256,
        temperature=0.1,
        gray_p=0.0,
        group_by=(("color", "background"), ("shape", "background")),
        group_size=32,
    ),
    "clip": Recipe("clip", epochs=4, lr=5e-4, distill_from="deit", kd_weight=1.0),
}
