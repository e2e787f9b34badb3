"""Train the zoo from scratch on the generated world (reproducible: fixed seeds, fixed step counts).

Recipes (:data:`RECIPES`; all AdamW, linear warm-up then cosine decay, gradient clipping 1.0,
random horizontal flips; a fixed pool of generated scenes, re-used each epoch):

* ``deit`` — supervised multi-attribute task: one cross-entropy per core attribute (shape, color,
  pattern, background) over its slice of the logits.
* ``maxvit`` — the same task.
* ``swin`` — the same task plus distillation from the trained ``zoo:deit`` (as DeiT distilled
  from a teacher): Hinton's soft-label loss on each attribute's logits and a cosine loss between
  a training-only linear map of its representation and deit's.
* ``dino`` — self-supervised, SimCLR-style InfoNCE (NT-Xent) between two views of each scene
  (not DINO's self-distillation): the second view is the same object (same shape, colour,
  pattern, background, size class) rendered again by the generator with a new position,
  rotation, radius, texture and noise, plus flips. Batches are made of runs of 32 scenes that
  share colour and background, or shape and background, so that telling a view's partner from
  the other scenes of its run takes the attributes the run does not share (hard negatives). No labels enter the loss;
  the projection head is dropped after training.
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
import torch.nn.functional as F
from torch import nn

from vitdecomp.world.scenes import ATTRIBUTES, CORE_ATTRIBUTES, make_scenes
from vitdecomp.zoo.models import HEAD_SIZES, IMAGE_SIZE, ZOO_CONFIGS, build_model

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
WEIGHTS_DIR = Path(__file__).parent / "weights"
CARDS_DIR = Path(__file__).parent / "cards"


@dataclass
class Recipe:
    objective: str  # "supervised" | "simclr" | "clip"
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


# ----------------------------------------------------------------------------------------------
# data


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> uint8 tensor [N, 3, H, W]."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def normalize(x: torch.Tensor, clip: bool = False) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float, normalised as the zoo model's preprocessing does."""
    mean, std = (OPENAI_MEAN, OPENAI_STD) if clip else (0.5, 0.5)
    m = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) if clip else mean
    s = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1) if clip else std
    return (x.float() / 255.0 - m) / s


def labels_of(scenes) -> torch.Tensor:
    return torch.from_numpy(np.stack([scenes.attributes[k] for k in CORE_ATTRIBUTES], 1))


def _flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    f = torch.rand(x.shape[0], generator=g) < 0.5
    return torch.where(f.view(-1, 1, 1, 1), x.flip(-1), x)


def _gray(x: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    """Random grayscale (per image, probability ``p``) on uint8 [B, 3, H, W]."""
    w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    lum = (x.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(x.dtype).expand_as(x)
    f = torch.rand(x.shape[0], generator=g) < p
    return torch.where(f.view(-1, 1, 1, 1), lum, x)


def multi_attribute_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = logits.new_zeros(())
    for i, part in enumerate(torch.split(logits, list(HEAD_SIZES.values()), dim=1)):
        loss = loss + F.cross_entropy(part, y[:, i])
    return loss / len(HEAD_SIZES)


def multi_attribute_accuracy(logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    out = {}
    parts = torch.split(logits, list(HEAD_SIZES.values()), dim=1)
    for i, (k, part) in enumerate(zip(HEAD_SIZES, parts, strict=True)):
        out[k] = (part.argmax(1) == y[:, i]).float().mean().item()
    return out


def _schedule(opt: torch.optim.Optimizer, step: int, total: int, lr: float, warmup: int) -> None:
    if step < warmup:
        f = (step + 1) / warmup
    else:
        f = 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    for group in opt.param_groups:
        group["lr"] = lr * f


def _param_groups(model: nn.Module, wd: float) -> list[dict]:
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or "pos_embed" in n or "token" in n or "positional" in n else decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


# ----------------------------------------------------------------------------------------------
# training


def train(
    name: str,
    recipe: Recipe | None = None,
    config: dict[str, Any] | None = None,
    progress: bool = True,
    teacher: nn.Module | None = None,
    log=print,
    weights_dir: Path | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train one zoo model from scratch; returns the model (eval mode) and a training record."""
    from tqdm import tqdm

    recipe = recipe or RECIPES[name]
    config = config or ZOO_CONFIGS[name]
    torch.manual_seed(recipe.seed)
    np.random.seed(recipe.seed)
    model = build_model(name, config)
    t0 = time.time()
    scenes = make_scenes(recipe.n_train, seed=recipe.data_seed, size=IMAGE_SIZE)
    x_all = to_tensor(scenes.images)
    y_all = labels_of(scenes)
    x_alt = None
    if recipe.objective == "simclr":
        fixed = {k: scenes.attributes[k] for k in ATTRIBUTES}
        alt = make_scenes(recipe.n_train, seed=recipe.data_seed + 1, size=IMAGE_SIZE, fixed=fixed)
        x_alt = to_tensor(alt.images)
    val = None
    if recipe.objective == "supervised":
        vs = make_scenes(512, seed=recipe.data_seed + 500, size=IMAGE_SIZE)
        val = (to_tensor(vs.images), labels_of(vs))
    t_data = time.time() - t0
    log(f"[{name}] generated {recipe.n_train} training scenes in {t_data:.1f}s")

    extra_modules = nn.ModuleDict()
    tokenizer = None
    teacher_id = "given" if teacher is not None else None
    if recipe.objective == "simclr":
        d = model.embed_dim
        extra_modules["proj"] = nn.Sequential(nn.Linear(d, 256), nn.GELU(), nn.Linear(256, 128))
    if recipe.objective == "clip":
        from vitdecomp.zoo.hub import clip_tokenizer

        tokenizer = clip_tokenizer(config["text_cfg"]["context_length"])
    if recipe.distill_from:
        if teacher is None:
            from vitdecomp.zoo.hub import load_zoo_model

            ckpt = None
            if weights_dir is not None and (Path(weights_dir) / f"{recipe.distill_from}.safetensors").is_file():
                ckpt = Path(weights_dir) / f"{recipe.distill_from}.safetensors"
            loaded_teacher = load_zoo_model(recipe.distill_from, checkpoint=ckpt)
            teacher_id = loaded_teacher.weights_id
            teacher = loaded_teacher.model
        teacher.eval()
        with torch.no_grad():
            td = _teacher_outputs(teacher, normalize(x_all[:2]))[0].shape[1]
        if recipe.objective == "clip":
            sd = config["embed_dim"]
        else:
            sd = getattr(model, "head_hidden_size", None) or model.num_features
        if recipe.distill_weight:
            extra_modules["distill"] = nn.Linear(sd, td)
        if recipe.kd_weight and recipe.objective == "clip":
            extra_modules["kd_head"] = nn.Linear(sd, sum(HEAD_SIZES.values()))
    if recipe.objective == "clip":
        vs = make_scenes(512, seed=recipe.data_seed + 500, size=IMAGE_SIZE)
        val = (to_tensor(vs.images), labels_of(vs))

    params = _param_groups(model, recipe.weight_decay) + _param_groups(extra_modules, recipe.weight_decay)
    opt = torch.optim.AdamW(params, lr=recipe.lr, betas=(0.9, 0.999))
    g = torch.Generator().manual_seed(recipe.seed)
    n = recipe.n_train
    groups = _group_keys(scenes, recipe.group_by) if recipe.group_by else None
    # the epoch length does not depend on the shuffle: count it with a throw-away generator
    steps_per_epoch = len(_epoch_order(n, recipe, torch.Generator().manual_seed(0), groups)) // recipe.batch_size
    total = steps_per_epoch * recipe.epochs
    caption_rng = np.random.default_rng(recipe.seed + 7)
    tok_cache: dict[str, torch.Tensor] = {}
    history = []
    step = 0
    model.train()
    extra_modules.train()
    t_train = time.time()
    for epoch in range(recipe.epochs):
        perm = _epoch_order(n, recipe, g, groups)
        if recipe.objective == "clip":
            from vitdecomp.world.captions import N_TEMPLATES, caption

            choices = caption_rng.integers(0, N_TEMPLATES * 3, n)
            texts = [caption({k: int(scenes.attributes[k][i]) for k in ATTRIBUTES}, int(choices[i])) for i in range(n)]
            missing = sorted({t for t in texts if t not in tok_cache})
            if missing:
                for t, tok in zip(missing, tokenizer(missing), strict=True):
                    tok_cache[t] = tok
            tokens_all = torch.stack([tok_cache[t] for t in texts])
        bar = tqdm(range(steps_per_epoch), desc=f"{name} epoch {epoch + 1}/{recipe.epochs}", disable=not progress)
        run_loss = 0.0
        for b in bar:
            idx = perm[b * recipe.batch_size : (b + 1) * recipe.batch_size]
            _schedule(opt, step, total, recipe.lr, recipe.warmup_steps)
            xb = _flip(x_all[idx], g)
            teacher_out = None
            if teacher is not None:
                with torch.no_grad():
                    teacher_out = _teacher_outputs(teacher, normalize(xb))
            if recipe.objective == "supervised":
                feats = model.forward_features(normalize(xb))
                rep = model.forward_head(feats, pre_logits=True)
                logits = model.forward_head(feats)
                loss = multi_attribute_loss(logits, y_all[idx])
            elif recipe.objective == "simclr":
                xa = _flip(x_alt[idx], g)
                if recipe.gray_p > 0:
                    xb, xa = _gray(xb, recipe.gray_p, g), _gray(xa, recipe.gray_p, g)
                za = extra_modules["proj"](model(normalize(xb)))
                zb = extra_modules["proj"](model(normalize(xa)))
                loss = nt_xent(za, zb, recipe.temperature)
            else:
                rep = model.encode_image(normalize(xb, clip=True))
                txt = model.encode_text(tokens_all[idx])
                loss = clip_loss(rep, txt, model.logit_scale)
                logits = extra_modules["kd_head"](rep) if "kd_head" in extra_modules else None
            if teacher_out is not None and recipe.distill_weight:
                sf = extra_modules["distill"](rep)
                loss = loss + recipe.distill_weight * (1 - F.cosine_similarity(sf, teacher_out[0], dim=1)).mean()
            if teacher_out is not None and recipe.kd_weight:
                loss = loss + recipe.kd_weight * soft_label_loss(logits, teacher_out[1], recipe.kd_temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(extra_modules.parameters()), 1.0)
            opt.step()
            if recipe.objective == "clip":
                with torch.no_grad():
                    model.logit_scale.clamp_(0, math.log(100))
            step += 1
            run_loss = 0.9 * run_loss + 0.1 * loss.item() if b else loss.item()
            if b % 20 == 0:
                bar.set_postfix(loss=f"{run_loss:.3f}")
        bar.close()
        entry = {"epoch": epoch + 1, "loss": round(run_loss, 4), "time_s": round(time.time() - t_train, 1)}
        if val is not None:
            model.eval()
            with torch.no_grad():
                if recipe.objective == "clip":
                    from vitdecomp.text import world_class_embeddings
                    from vitdecomp.zoo.evaluate import zero_shot

                    img = model.encode_image(normalize(val[0], clip=True))
                    classes = world_class_embeddings(lambda texts: model.encode_text(tokenizer(texts)))
                    acc = zero_shot(img, classes, val[1])
                else:
                    acc = multi_attribute_accuracy(model(normalize(val[0])), val[1])
            entry["val_acc"] = {k: round(v, 4) for k, v in acc.items()}
            model.train()
        history.append(entry)
        log(f"[{name}] epoch {epoch + 1}: {json.dumps(entry)}")
    model.eval()
    record = {
        "recipe": asdict(recipe),
        "history": history,
        "train_time_s": round(time.time() - t0, 1),
        "data_time_s": round(t_data, 1),
        "steps": total,
        "distill_teacher": teacher_id,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }
    return model, record


def _teacher_outputs(teacher: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's representation [B, D] and its multi-attribute logits [B, NUM_LOGITS]."""
    feats = teacher.forward_features(x)
    return teacher.forward_head(feats, pre_logits=True), teacher.forward_head(feats)


def soft_label_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's soft-target loss, T² · KL(teacher_T || student_T), averaged over the attributes' slices."""
    sizes = list(HEAD_SIZES.values())
    loss = student.new_zeros(())
    for s, t in zip(torch.split(student, sizes, 1), torch.split(teacher, sizes, 1), strict=True):
        loss = loss + F.kl_div(
            F.log_softmax(s / temperature, 1), F.log_softmax(t / temperature, 1), log_target=True, reduction="batchmean"
        )
    return loss * temperature**2 / len(sizes)


def _group_keys(scenes, groupings: tuple[tuple[str, ...], ...]) -> np.ndarray:
    """``[G, N]``: per grouping, one integer per scene naming its combination of the grouping's values."""
    keys = np.zeros((len(groupings), len(scenes)), dtype=np.int64)
    for i, attributes in enumerate(groupings):
        for k in attributes:
            keys[i] = keys[i] * len(ATTRIBUTES[k]) + scenes.attributes[k]
    return keys


def _epoch_order(n: int, recipe: Recipe, g: torch.Generator, keys: np.ndarray | None) -> torch.Tensor:
    """The epoch's sample order: a permutation, or (``recipe.group_by``) runs of ``group_size`` scenes
    sharing the attributes of one grouping, the runs shuffled. The shuffled scenes are split evenly
    between the groupings (``keys`` from :func:`_group_keys`); scenes left over from a combination's
    last run are dropped for the epoch; a batch holds ``batch_size / group_size`` runs."""
    perm = torch.randperm(n, generator=g)
    if keys is None:
        return perm
    runs = []
    for key, part in zip(keys, np.array_split(perm.numpy(), len(keys)), strict=True):
        for value in np.unique(key[part]):
            members = part[key[part] == value]
            usable = len(members) // recipe.group_size * recipe.group_size
            runs.extend(np.split(members[:usable], usable // recipe.group_size))
    order = torch.randperm(len(runs), generator=g).tolist()
    return torch.from_numpy(np.concatenate([runs[i] for i in order]))


def nt_xent(za: torch.Tensor, zb: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalised-temperature cross-entropy over 2B views."""
    z = F.normalize(torch.cat([za, zb]), dim=1)
    sim = z @ z.t() / temperature
    b = za.shape[0]
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)])
    return F.cross_entropy(sim, target)


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    img = F.normalize(img, dim=-1)
    txt = F.normalize(txt, dim=-1)
    logits = logit_scale.exp() * img @ txt.t()
    target = torch.arange(len(img))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


# ----------------------------------------------------------------------------------------------
# saving


def save_checkpoint(model: nn.Module, name: str, weights_dir: Path | None = None) -> Path:
    """Write the state dict as fp16 safetensors (integer buffers kept as they are)."""
    from safetensors.torch import save_file

    weights_dir = Path(weights_dir or WEIGHTS_DIR)
    weights_dir.mkdir(parents=True, exist_ok=True)
    sd = {
        k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).contiguous().clone()
        for k, v in model.state_dict().items()
    }
    path = weights_dir / f"{name}.safetensors"
    save_file(sd, str(path), metadata={"name": name, "format": "pt", "dtype": "float16"})
    path.chmod(0o644)
    return path


def write_card(name: str, card: dict[str, Any], cards_dir: Path | None = None) -> Path:
    cards_dir = Path(cards_dir or CARDS_DIR)
    cards_dir.mkdir(parents=True, exist_ok=True)
    path = cards_dir / f"{name}.json"
    path.write_text(json.dumps(card, indent=1, default=_json_default) + "\n")
    return path


def _json_default(o):
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(type(o))


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
    from vitdecomp.models.loading import file_digest

    n_params = sum(p.numel() for p in model.parameters())
    card: dict[str, Any] = {
        "name": name,
        "trained": True,
        "family": ZOO_CONFIGS[name]["family"],
        "config": ZOO_CONFIGS[name],
        "seed": record["recipe"]["seed"],
        "objective": objective_text(RECIPES[name]),
        "training": record,
        "params": n_params,
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
        from vitdecomp.zoo.evaluate import evaluate_model

        metrics = evaluate_model(name, checkpoint=path, progress=progress, config=ZOO_CONFIGS[name])
        card["metrics"] = metrics
        write_card(name, card, cards_dir)
        log(f"[{name}] metrics: {json.dumps(metrics)}")
    return card


def is_up_to_date(name: str, weights_dir: Path | None = None, cards_dir: Path | None = None) -> bool:
    """Whether ``NAME``'s card and weights were made by the current recipe and config (and, for a
    student, from the teacher weights now in place), so a resumed ``zoo train`` may skip it."""
    from vitdecomp.models.loading import file_digest

    card_path = Path(cards_dir or CARDS_DIR) / f"{name}.json"
    weights = Path(weights_dir or WEIGHTS_DIR) / f"{name}.safetensors"
    if not (card_path.is_file() and weights.is_file()):
        return False
    card = json.loads(card_path.read_text())
    recipe = RECIPES[name]

    def same(a: Any, b: Any) -> bool:
        return json.loads(json.dumps(a, default=_json_default)) == json.loads(json.dumps(b, default=_json_default))

    if card.get("weights", {}).get("sha256_16") != file_digest(weights):
        return False
    if not (
        same(card.get("config"), ZOO_CONFIGS[name]) and same(card.get("training", {}).get("recipe"), asdict(recipe))
    ):
        return False
    if recipe.distill_from:
        teacher = Path(weights_dir or WEIGHTS_DIR) / f"{recipe.distill_from}.safetensors"
        teacher = teacher if teacher.is_file() else WEIGHTS_DIR / f"{recipe.distill_from}.safetensors"
        if (
            not teacher.is_file()
            or card["training"].get("distill_teacher") != f"zoo:{recipe.distill_from}@{file_digest(teacher)}"
        ):
            return False
    return True


_OBJECTIVE_TEXT = {
    "supervised": "supervised multi-attribute classification (shape, color, pattern, background heads)",
    "simclr": "self-supervised SimCLR-style InfoNCE between two generator-rendered views of the same object",
    "clip": "CLIP contrastive image-caption loss",
}


def objective_text(recipe: Recipe) -> str:
    """One line saying what the recipe optimises."""
    text = _OBJECTIVE_TEXT[recipe.objective]
    if recipe.objective == "simclr" and recipe.group_by:
        shared = " or ".join("+".join(grouping) for grouping in recipe.group_by)
        text += f" (batches of runs of {recipe.group_size} scenes sharing {shared})"
    if recipe.distill_from and recipe.distill_weight:
        text += f" + cosine distillation of zoo:{recipe.distill_from}'s representation"
    if recipe.distill_from and recipe.kd_weight:
        text += f" + soft-label distillation of zoo:{recipe.distill_from}'s logits (T={recipe.kd_temperature:g})"
    return text


def _open_clip_version() -> str:
    try:
        import open_clip

        return open_clip.__version__
    except Exception:  # pragma: no cover
        return "unknown"
