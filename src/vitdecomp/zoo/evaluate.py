"""Measure the zoo on held-out generated scenes: linear probes, task accuracy, CLIP zero-shot, R@1.

``vitdecomp zoo evaluate [NAME ...] [--write-cards]`` prints the table of docs/zoo.md.

* Probe: multinomial logistic regression (L-BFGS, L2 1e-3, standardised features) on the
  representation (:func:`vitdecomp.zoo.models.representation`) of ``N_PROBE_TRAIN`` scenes
  (seed 2001), accuracy on ``N_TEST`` other scenes (seed 2002); none of them was seen in training
  (training used seed 1000/1001).
* Task accuracy (supervised models): the model's own heads on the test scenes, per attribute.
* Planting (models trained with planted roles): the held-out accuracy of a probe (as above) on each
  head's and MLP's direct contribution as :func:`vitdecomp.decompose` gives it, per core attribute
  (:func:`planting_metrics`, ``N_PLANTING_TRAIN`` / ``N_PLANTING_TEST`` scenes of the probe seeds).
* CLIP zero-shot: per attribute, the class whose prompt-averaged text embedding is nearest
  (prompts: :data:`vitdecomp.world.PROMPTS`). Image→caption R@1: each test image against the
  captions of all ``N_RETRIEVAL`` test images (a hit when the top caption is the image's own
  caption string — identical strings of other images count as hits).
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vitdecomp.text import world_class_embeddings
from vitdecomp.world.attributes import CORE_ATTRIBUTES
from vitdecomp.world.scenes import make_scenes
from vitdecomp.zoo.cards import read_card, write_card
from vitdecomp.zoo.data import labels_of, normalize, to_tensor
from vitdecomp.zoo.hub import load_zoo_model
from vitdecomp.zoo.models import HEAD_SIZES, IMAGE_SIZE, NUM_LOGITS, representation

N_PROBE_TRAIN = 4000
N_TEST = 2000
N_RETRIEVAL = 1000
N_PLANTING_TRAIN = 2000
N_PLANTING_TEST = 1000
PROBE_SEEDS = (2001, 2002)


@torch.no_grad()
def features(model, name: str, images: np.ndarray, batch: int = 250, clip: bool = False) -> torch.Tensor:
    x = to_tensor(images)
    out = [representation(model, name, normalize(x[i : i + batch], clip=clip)) for i in range(0, len(x), batch)]
    return torch.cat(out).float()


@torch.no_grad()
def logits_of(model, images: np.ndarray, batch: int = 250) -> torch.Tensor:
    x = to_tensor(images)
    return torch.cat([model(normalize(x[i : i + batch])) for i in range(0, len(x), batch)])


def linear_probe(
    f_train: torch.Tensor, y_train: torch.Tensor, f_test: torch.Tensor, y_test: torch.Tensor, l2: float = 1e-3
) -> float:
    """Held-out accuracy of a multinomial logistic regression fitted with L-BFGS."""
    mu, sd = f_train.mean(0), f_train.std(0) + 1e-6
    a, b = (f_train - mu) / sd, (f_test - mu) / sd
    k = int(max(y_train.max(), y_test.max())) + 1
    w = torch.zeros(a.shape[1], k, requires_grad=True)
    bias = torch.zeros(k, requires_grad=True)
    opt = torch.optim.LBFGS([w, bias], lr=1, max_iter=300, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(a @ w + bias, y_train) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return ((b @ w + bias).argmax(1) == y_test).float().mean().item()


def _data():
    tr = make_scenes(N_PROBE_TRAIN, seed=PROBE_SEEDS[0], size=IMAGE_SIZE)
    te = make_scenes(N_TEST, seed=PROBE_SEEDS[1], size=IMAGE_SIZE)
    return tr, te


def evaluate_model(name: str, checkpoint=None, progress: bool = False, data=None, config=None) -> dict[str, Any]:
    """All held-out measurements of one zoo model (loaded from its safetensors file)."""
    t0 = time.time()
    loaded = load_zoo_model(name, checkpoint=checkpoint, config=config)
    model = loaded.model
    tr, te = data or _data()
    is_clip = name == "clip"
    f_tr = features(model, name, tr.images, clip=is_clip)
    f_te = features(model, name, te.images, clip=is_clip)
    out: dict[str, Any] = {"n_probe_train": len(tr), "n_test": len(te), "probe": {}}
    for k in CORE_ATTRIBUTES:
        y_tr = torch.from_numpy(tr.attributes[k])
        y_te = torch.from_numpy(te.attributes[k])
        out["probe"][k] = round(linear_probe(f_tr, y_tr, f_te, y_te), 4)
    out["probe_min"] = min(out["probe"].values())
    if not is_clip and getattr(model, "num_classes", 0) == NUM_LOGITS:
        acc = multi_attribute_accuracy(logits_of(model, te.images), labels_of(te))
        out["task"] = {k: round(v, 4) for k, v in acc.items()}
        out["task_min"] = min(out["task"].values())
    if is_clip:
        out.update(clip_metrics(loaded, te, f_te))
    out["eval_time_s"] = round(time.time() - t0, 1)
    return out


@torch.no_grad()
def direct_branch_contributions(model, images: np.ndarray, batch: int = 250) -> tuple[list[str], torch.Tensor]:
    """A timm ViT's heads and MLPs (labels as :func:`vitdecomp.decompose` names them) and their direct
    contributions to the representation ``[N, M, D]`` as the decomposition gives them."""
    from vitdecomp.api import decompose
    from vitdecomp.evaluation.components import is_branch

    x = to_tensor(images)
    parts, labels = [], None
    for i in range(0, len(x), batch):
        d = decompose(model, normalize(x[i : i + batch]))
        keep = [j for j, lab in enumerate(d.names) if is_branch(lab)]
        labels = [d.names[j] for j in keep]
        parts.append(d.contributions[:, keep].float())
    return labels or [], torch.cat(parts)


def planting_metrics(
    name: str, planted: dict[str, list[str]], checkpoint=None, config=None, data=None, progress: bool = False
) -> dict[str, Any]:
    """How well a planted map held on held-out scenes: every head's and MLP's probe accuracy per core
    attribute (``accuracy {label: {attribute: acc}}``), chance (the test set's majority share), and per
    attribute the worst planted head's accuracy and the best other head's and other branch's."""
    from vitdecomp.probes import batched_probe

    t0 = time.time()
    model = load_zoo_model(name, checkpoint=checkpoint, config=config).model
    tr, te = data or (
        make_scenes(N_PLANTING_TRAIN, seed=PROBE_SEEDS[0], size=IMAGE_SIZE),
        make_scenes(N_PLANTING_TEST, seed=PROBE_SEEDS[1], size=IMAGE_SIZE),
    )
    labels, c_tr = direct_branch_contributions(model, tr.images)
    c_te = direct_branch_contributions(model, te.images)[1]
    x_tr, x_te = c_tr.transpose(0, 1).contiguous(), c_te.transpose(0, 1).contiguous()
    acc: dict[str, dict[str, float]] = {lab: {} for lab in labels}
    summary: dict[str, dict[str, Any]] = {}
    for a in CORE_ATTRIBUTES:
        y_tr, y_te = torch.from_numpy(tr.attributes[a]).long(), torch.from_numpy(te.attributes[a]).long()
        per = batched_probe(x_tr, y_tr, x_te, y_te)
        for lab, v in zip(labels, per.tolist(), strict=True):
            acc[lab][a] = round(v, 4)
        mine = planted.get(a, [])
        others = [(lab, acc[lab][a]) for lab in labels if lab not in mine]
        other_heads = [o for o in others if not o[0].endswith("mlp")]
        summary[a] = {
            "chance": round(float(np.bincount(te.attributes[a]).max() / len(te)), 4),
            "planted_min": min((acc[lab][a] for lab in mine), default=None),
            "other_head_max": max((v for _, v in other_heads), default=None),
            "other_head_argmax": max(other_heads, key=lambda o: o[1], default=(None,))[0],
            "other_branch_max": max((v for _, v in others), default=None),
        }
        if progress:
            print(f"[{name}] planting {a}: {json.dumps(summary[a])}", flush=True)
    return {
        "n_probe_train": len(tr),
        "n_test": len(te),
        "accuracy": acc,
        "summary": summary,
        "eval_time_s": round(time.time() - t0, 1),
    }


def multi_attribute_accuracy(logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Accuracy of each core attribute's head: logits [N, NUM_LOGITS], labels [N, A]."""
    out = {}
    parts = torch.split(logits, list(HEAD_SIZES.values()), dim=1)
    for i, (k, part) in enumerate(zip(HEAD_SIZES, parts, strict=True)):
        out[k] = (part.argmax(1) == y[:, i]).float().mean().item()
    return out


def zero_shot(image_features: torch.Tensor, classes: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, float]:
    """Zero-shot accuracy per attribute: nearest class embedding to each image [N, D]; labels [N, A] in
    ``CORE_ATTRIBUTES`` order."""
    img = F.normalize(image_features.float(), dim=-1)
    return {
        k: ((img @ classes[k].t()).argmax(1) == labels[:, i]).float().mean().item()
        for i, k in enumerate(CORE_ATTRIBUTES)
    }


@torch.no_grad()
def clip_zero_shot(model, tokenizer, image_features: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """A CLIP model's zero-shot accuracy per core attribute, its text tower reading the world's
    prompts (:func:`vitdecomp.text.world_class_embeddings`)."""
    classes = world_class_embeddings(lambda texts: model.encode_text(tokenizer(texts)))
    return zero_shot(image_features, classes, labels)


@torch.no_grad()
def clip_metrics(loaded, te, f_te: torch.Tensor) -> dict[str, Any]:
    model, tok = loaded.model, loaded.tokenizer
    img = F.normalize(f_te, dim=-1)
    zs = {k: round(v, 4) for k, v in clip_zero_shot(model, tok, f_te, labels_of(te)).items()}
    n = min(N_RETRIEVAL, len(te))
    caps = te.captions[:n]
    txt = torch.cat([F.normalize(model.encode_text(tok(caps[i : i + 250])), dim=-1) for i in range(0, n, 250)])
    top = (img[:n] @ txt.t()).argmax(1).tolist()
    r1 = float(np.mean([caps[j] == caps[i] for i, j in enumerate(top)]))
    return {
        "zero_shot": zs,
        "zero_shot_min": min(zs.values()),
        "r1_image_to_caption": round(r1, 4),
        "n_retrieval": n,
    }


def table(cards: list[dict[str, Any]]) -> str:
    """Markdown table of the cards' headline numbers."""
    head = (
        "| model | params | size MB | probe shape | probe color | probe pattern | probe background "
        "| task acc (min) | zero-shot (shape/color/pattern/bg) | R@1 | train time |"
    )
    lines = [head, "|" + "---|" * 11]
    for c in cards:
        m = c.get("metrics", {})
        p = m.get("probe", {})
        zs = m.get("zero_shot")
        lines.append(
            "| {name} | {params} | {size} | {ps} | {pc} | {pp} | {pb} | {task} | {zs} | {r1} | {tt} |".format(
                name=c["name"],
                params=f"{c['params'] / 1e6:.2f}M" if "params" in c else "-",
                size=c.get("weights", {}).get("size_mb", "-"),
                ps=_pct(p.get("shape")),
                pc=_pct(p.get("color")),
                pp=_pct(p.get("pattern")),
                pb=_pct(p.get("background")),
                task=_pct(m.get("task_min")),
                zs="/".join(_pct(zs[k]) for k in CORE_ATTRIBUTES) if zs else "-",
                r1=_pct(m.get("r1_image_to_caption")),
                tt=f"{c['training']['train_time_s'] / 60:.1f} min" if "training" in c else "-",
            )
        )
    return "\n".join(lines)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def evaluate_zoo(names: list[str], write_cards: bool = False) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every measurement of the zoo models ``names`` on the same held-out scenes, printed as they come:
    ``(cards with the new metrics, {name: metrics})``; ``write_cards``: store them in the cards."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = _data()
    cards, allm = [], {}
    for name in names:
        card = read_card(name) or {"name": name}
        metrics = evaluate_model(name, data=data)
        allm[name] = metrics
        card["metrics"] = metrics
        if write_cards:
            write_card(name, card)
        cards.append(card)
        print(name, json.dumps(metrics), flush=True)
    return cards, allm
