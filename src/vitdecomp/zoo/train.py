"""Train the zoo from scratch on the generated world (reproducible: fixed seeds, fixed step counts).

Recipes (:data:`RECIPES`; all AdamW, linear warm-up then cosine decay, gradient clipping 1.0,
random horizontal flips; a fixed pool of generated scenes, re-used each epoch):

* ``deit`` — supervised multi-attribute task: one cross-entropy per core attribute (shape, color,
  pattern, background) over its slice of the logits.
* ``maxvit`` — the same task.
* ``swin`` — the same task plus distillation from the trained ``zoo:deit`` (as DeiT distilled
  from a teacher): Hinton's soft-label loss on each attribute's logits and a cosine loss between
  a training-only linear map of its representation and deit's.
* ``simclr`` — self-supervised, SimCLR-style InfoNCE (NT-Xent) between two views of each scene: the
  second view is the same object (same shape, colour, pattern, background, size class) rendered
  again by the generator with a new position, rotation, radius, texture and noise, plus flips.
  Batches are made of runs of 32 scenes that share colour and background, or shape and background,
  so that telling a view's partner from the other scenes of its run takes the attributes the run
  does not share (hard negatives). No labels enter the loss; the projection head is dropped after
  training. (Shipped as ``zoo:dino`` until issue 21.)
* ``dino`` — self-supervised DINO self-distillation (:class:`~vitdecomp.zoo.objectives.Dino`): an EMA
  teacher's centred, sharpened prototype distribution over two global views is the target of the
  student's over every view (multi-crop); the views are crops that keep the object, from the scene
  and from the generator's renderings of the same object (the local crops on a new background). No
  labels enter the loss or the choice of views; the head is dropped and the teacher's backbone kept.
* ``planted`` — deit's task plus planted roles (``PLANTED_MAP``): per-component linear probes on the
  direct contributions make designated heads carry designated attributes; every other head and MLP
  (and each planted head for the other attributes) is made invariant to them by a between-class
  variance penalty and gradient-reversed probes. The card states the map and how well it held.
* ``clip`` — open_clip's symmetric contrastive loss between images and their captions (a new
  phrasing every epoch), plus distillation from ``zoo:deit``: cosine on the representation and
  soft labels on a training-only linear head over the image embedding.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vitdecomp.models.loaded import file_digest
from vitdecomp.world.scenes import make_scenes
from vitdecomp.zoo.cards import save_checkpoint, write_card
from vitdecomp.zoo.data import epoch_order, flip, group_keys, to_tensor
from vitdecomp.zoo.evaluate import evaluate_model, planting_metrics
from vitdecomp.zoo.hub import load_zoo_model
from vitdecomp.zoo.models import IMAGE_SIZE, ZOO_CONFIGS, build_model
from vitdecomp.zoo.objectives import OBJECTIVES, Distillation, Objective, objective_text
from vitdecomp.zoo.recipes import RECIPES, Recipe

__all__ = ["RECIPES", "Recipe", "train", "train_and_save"]


@dataclass
class _Run:
    """What the steps of one training run share."""

    recipe: Recipe
    model: nn.Module
    objective: Objective
    distillation: Distillation | None
    extra: nn.ModuleDict  # the training-only modules (the objective's, then distillation's)
    opt: torch.optim.Optimizer
    x: torch.Tensor  # uint8 [N, 3, H, W], the training scenes
    g: torch.Generator  # shuffles and augmentations
    steps_per_epoch: int
    total: int


def train(
    name: str,
    recipe: Recipe | None = None,
    config: dict[str, Any] | None = None,
    progress: bool = True,
    teacher: nn.Module | None = None,
    log=print,
    weights_dir: Path | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train one zoo model from scratch; returns the model (eval mode) and a training record.

    ``teacher`` replaces the zoo model the recipe distils from (else it is loaded from
    ``weights_dir`` when that holds its weights, or from the shipped ones)."""
    recipe = recipe or RECIPES[name]
    config = config or ZOO_CONFIGS[name]
    torch.manual_seed(recipe.seed)
    np.random.seed(recipe.seed)
    model = build_model(name, config)
    t0 = time.time()
    scenes = make_scenes(recipe.n_train, seed=recipe.data_seed, size=IMAGE_SIZE)
    x = to_tensor(scenes.images)
    objective = OBJECTIVES[recipe.objective](recipe, model, config, scenes)
    t_data = time.time() - t0
    log(f"[{name}] generated {recipe.n_train} training scenes in {t_data:.1f}s")
    teacher, teacher_id = _teacher(recipe, teacher, weights_dir)
    distillation = Distillation(recipe, teacher, objective, x[:2]) if recipe.distill_from else None
    keys = group_keys(scenes, recipe.group_by) if recipe.group_by else None
    run = _new_run(recipe, model, objective, distillation, x, keys)
    history = []
    model.train()
    run.extra.train()
    t_train = time.time()
    for epoch in range(recipe.epochs):
        perm = epoch_order(recipe.n_train, run.g, keys, recipe.group_size)
        objective.start_epoch()
        loss = _train_epoch(run, epoch, perm, desc=f"{name} epoch {epoch + 1}/{recipe.epochs}", progress=progress)
        entry = {"epoch": epoch + 1, "loss": round(loss, 4), "time_s": round(time.time() - t_train, 1)}
        history.append(entry | _checks(objective))
        log(f"[{name}] epoch {epoch + 1}: {json.dumps(history[-1])}")
    objective.finish()
    model.eval()
    return model, {
        "recipe": asdict(recipe),
        "history": history,
        "train_time_s": round(time.time() - t0, 1),
        "data_time_s": round(t_data, 1),
        "steps": run.total,
        "distill_teacher": teacher_id,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }


def _new_run(
    recipe: Recipe,
    model: nn.Module,
    objective: Objective,
    distillation: Distillation | None,
    x: torch.Tensor,
    keys: np.ndarray | None,
) -> _Run:
    """A run's optimiser (over the model and the training-only modules), generator and step counts."""
    extra = nn.ModuleDict({**objective.modules, **(distillation.modules if distillation else {})})
    params = _param_groups(model, recipe.weight_decay) + _param_groups(extra, recipe.weight_decay)
    # the epoch length does not depend on the shuffle: count it with a throw-away generator
    n_used = len(epoch_order(recipe.n_train, torch.Generator().manual_seed(0), keys, recipe.group_size))
    steps_per_epoch = n_used // recipe.batch_size
    return _Run(
        recipe=recipe,
        model=model,
        objective=objective,
        distillation=distillation,
        extra=extra,
        opt=torch.optim.AdamW(params, lr=recipe.lr, betas=(0.9, 0.999)),
        x=x,
        g=torch.Generator().manual_seed(recipe.seed),
        steps_per_epoch=steps_per_epoch,
        total=steps_per_epoch * recipe.epochs,
    )


def _checks(objective: Objective) -> dict[str, Any]:
    """What the history keeps of the objective's checks after an epoch: ``val_acc`` and ``diagnostics``."""
    out = {}
    for key, values in (("val_acc", objective.validate()), ("diagnostics", objective.diagnostics())):
        if values is not None:
            out[key] = {k: round(v, 4) for k, v in values.items()}
    return out


def _train_epoch(run: _Run, epoch: int, perm: torch.Tensor, desc: str, progress: bool) -> float:
    """One pass over ``perm`` in batches; returns the running (exponentially smoothed) loss."""
    from tqdm import tqdm

    recipe, model = run.recipe, run.model
    params = list(model.parameters()) + list(run.extra.parameters())
    bar = tqdm(range(run.steps_per_epoch), desc=desc, disable=not progress)
    run_loss = 0.0
    for b in bar:
        idx = perm[b * recipe.batch_size : (b + 1) * recipe.batch_size]
        _schedule(run.opt, epoch * run.steps_per_epoch + b, run.total, recipe.lr, recipe.warmup_steps)
        xb = flip(run.x[idx], run.g)
        targets = run.distillation.targets(xb) if run.distillation else None
        loss, rep, logits = run.objective.loss(idx, xb, run.g)
        if run.distillation:
            loss = run.distillation.add_loss(loss, targets, rep, logits)
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        run.opt.step()
        run.objective.after_step()
        run_loss = 0.9 * run_loss + 0.1 * loss.item() if b else loss.item()
        if b % 20 == 0:
            bar.set_postfix(loss=f"{run_loss:.3f}")
    bar.close()
    return run_loss


def _teacher(
    recipe: Recipe, teacher: nn.Module | None, weights_dir: Path | None
) -> tuple[nn.Module | None, str | None]:
    """The model distilled from and the id the training record keeps for it: the given one
    (``"given"``), else the zoo model ``recipe.distill_from`` (from ``weights_dir`` when it holds its
    weights, else the shipped ones), else none."""
    if teacher is not None:
        return teacher, "given"
    if not recipe.distill_from:
        return None, None
    ckpt = Path(weights_dir) / f"{recipe.distill_from}.safetensors" if weights_dir is not None else None
    loaded = load_zoo_model(recipe.distill_from, checkpoint=ckpt if ckpt is not None and ckpt.is_file() else None)
    return loaded.model, loaded.weights_id


def _schedule(opt: torch.optim.Optimizer, step: int, total: int, lr: float, warmup: int) -> None:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        f = (step + 1) / warmup
    else:
        f = 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    for group in opt.param_groups:
        group["lr"] = lr * f


def _param_groups(model: nn.Module, wd: float) -> list[dict]:
    """AdamW groups: weight decay on the weights, none on biases, norms, tokens and position embeddings."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or "pos_embed" in n or "token" in n or "positional" in n else decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


# ----------------------------------------------------------------------------------------------
# training and saving


def train_and_save(
    name: str,
    progress: bool = True,
    evaluate: bool = True,
    weights_dir: Path | None = None,
    cards_dir: Path | None = None,
    log=print,
) -> dict[str, Any]:
    """Train ``name`` from scratch, write ``weights/NAME.safetensors`` and ``cards/NAME.json``
    (with the held-out measurements when ``evaluate``); returns the card."""
    import timm

    model, record = train(name, progress=progress, log=log, weights_dir=weights_dir)
    path = save_checkpoint(model, name, weights_dir)
    card: dict[str, Any] = {
        "name": name,
        "trained": True,
        "family": ZOO_CONFIGS[name]["family"],
        "config": ZOO_CONFIGS[name],
        "seed": record["recipe"]["seed"],
        "objective": objective_text(RECIPES[name]),
        "training": record,
        "params": sum(p.numel() for p in model.parameters()),
        "weights": {
            "file": path.name,
            "sha256_16": file_digest(path),
            "size_mb": round(path.stat().st_size / 1e6, 2),
            "dtype": "float16",
        },
        "image_size": IMAGE_SIZE,
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "open_clip": _open_clip_version()},
    }
    write_card(name, card, cards_dir)
    if evaluate:
        metrics = evaluate_model(name, checkpoint=path, progress=progress, config=ZOO_CONFIGS[name])
        card["metrics"] = metrics
        write_card(name, card, cards_dir)
        log(f"[{name}] metrics: {json.dumps(metrics)}")
    planted = RECIPES[name].planted
    if planted:
        card["planted"] = {"map": planted}
        if evaluate:
            card["planted"].update(planting_metrics(name, planted, checkpoint=path, config=ZOO_CONFIGS[name]))
        write_card(name, card, cards_dir)
    return card


def _open_clip_version() -> str:
    try:
        import open_clip

        return open_clip.__version__
    except Exception:  # pragma: no cover
        return "unknown"
