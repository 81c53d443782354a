"""The non-diffusion setting of benchmarks/claims.py: LoRA on the toy CLIP's vision transformer.

Task: tell the surface pattern of a shape (plain, striped, dotted, checkered) in toy-world scenes.
The toy world draws every shape in one flat colour, so the toy CLIP (``assets/toy-clip``) never saw
a pattern; a linear probe on its frozen features gets about three in four right. LoRA (rank 4,
alpha 4) on the attention projections (q, k, v, out) of the vision transformer's four layers is
the only thing trained: the classifier on top is that linear probe, fitted once on the base
model's features of the training images and then frozen, so every trained parameter is a LoRA
factor and the optimizers differ only where the preconditioner acts.

Judge: cross-entropy (and accuracy) on 256 fixed held-out scenes, every ``eval_every`` steps.
Prior drift: mean squared difference between the adapted and the base model's normalised image
embeddings of 128 fixed plain toy-world scenes (the pretraining domain; lower = less forgetting).

Deterministic given (optimizer, lr, seed, batch size): the data are a function of fixed world seeds,
the data order and the LoRA initialisation a function of the run's seed only, so runs with the
same seed are paired across optimizers.
"""

from __future__ import annotations

import functools
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
CLIP_PATH = ROOT / "assets" / "toy-clip"
RANK = 4
TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
CLASSES = ("plain", "striped", "dotted", "checkered")
TRAIN_WORLD_SEED, EVAL_WORLD_SEED, PRIOR_WORLD_SEED = 101, 202, 303


@dataclass
class ClipData:
    train_x: torch.Tensor
    train_y: torch.Tensor
    eval_x: torch.Tensor
    eval_y: torch.Tensor
    prior_x: torch.Tensor
    head_w: torch.Tensor  # (64, 4): the frozen linear probe
    head_b: torch.Tensor
    prior_base: torch.Tensor  # base model's normalised embeddings of prior_x
    probe: dict[str, float]  # the probe alone (base features): held-out loss and accuracy


def _pixels(images: list[Any]) -> torch.Tensor:
    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def pattern_scenes(world_seed: int, n: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` single-shape scenes, each with a pattern drawn uniformly from CLASSES (0 = plain)."""
    from difflora.toy.world import COLOURS, PATTERNS, Scene, Shape, ToyWorld, render

    world = ToyWorld(seed=world_seed, size=size, split="all", relation_prob=0.0)
    images, labels = [], []
    for i in range(n):
        scene = world.scene(i)
        obj = scene.objects[0]
        rng = random.Random(f"pattern/{world_seed}/{i}")
        label = rng.randrange(len(CLASSES))
        pattern = None if label == 0 else PATTERNS[label - 1]
        second = rng.choice([c for c in COLOURS if c != obj.colour]) if pattern else None
        shape = Shape(obj.shape, obj.colour, obj.cx, obj.cy, max(obj.radius, 0.25), pattern=pattern,
                      pattern_colour=second, angle=obj.angle)
        images.append(render(Scene((shape,), scene.background), size))
        labels.append(label)
    assert [PATTERNS[k - 1] for k in range(1, 4)] == list(CLASSES[1:])
    return _pixels(images), torch.tensor(labels)


def load_model(seed: int | None) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(vision transformer, visual projection) of the toy CLIP; with LoRA when ``seed`` is given."""
    from transformers import CLIPModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    clip = CLIPModel.from_pretrained(str(CLIP_PATH))
    vision, projection = clip.vision_model, clip.visual_projection
    for p in (*vision.parameters(), *projection.parameters()):
        p.requires_grad_(False)
    if seed is not None:
        from peft import LoraConfig, inject_adapter_in_model

        torch.manual_seed(seed)  # A ~ N(0, 1/r) from the global generator; B = 0
        inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian",
                                           target_modules=TARGETS), vision)
    return vision, projection


def _embed(vision, projection, x: torch.Tensor) -> torch.Tensor:
    return F.normalize(projection(vision(pixel_values=x).pooler_output), dim=-1)


@functools.lru_cache(maxsize=2)
def clip_data(n_train: int = 2048, n_eval: int = 256, n_prior: int = 128) -> ClipData:
    """The task's fixed data and the frozen probe (built once per process; deterministic)."""
    from difflora.toy.world import ToyWorld, render

    train_x, train_y = pattern_scenes(TRAIN_WORLD_SEED, n_train)
    eval_x, eval_y = pattern_scenes(EVAL_WORLD_SEED, n_eval)
    world = ToyWorld(seed=PRIOR_WORLD_SEED, size=32, split="all", relation_prob=0.3)
    prior_x = _pixels([render(world.scene(i), 32) for i in range(n_prior)])
    vision, projection = load_model(None)
    vision.eval()
    with torch.no_grad():
        feats = torch.cat([vision(pixel_values=x).pooler_output for x in train_x.split(256)]).double()
        eval_feats = vision(pixel_values=eval_x).pooler_output.double()
        prior_base = _embed(vision, projection, prior_x)
    w = torch.zeros(feats.shape[1], len(CLASSES), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(len(CLASSES), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(feats @ w + b, train_y) + 1e-3 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w, b = w.detach(), b.detach()
    with torch.no_grad():
        logits = eval_feats @ w + b
        probe = {"eval_loss": float(F.cross_entropy(logits, eval_y)),
                 "eval_acc": float((logits.argmax(1) == eval_y).double().mean())}
    return ClipData(train_x, train_y, eval_x, eval_y, prior_x, w.float(), b.float(), prior_base, probe)


def build(optimizer: str, named: list[tuple[str, torch.Tensor]], lr: float, model: torch.nn.Module):
    """The optimizer of a grid name: weight decay 0, torch's defaults otherwise (SGD without momentum)."""
    from difflora.optim import ScaledAdamW, build_optimizer

    if optimizer == "scaled_adamw_official":
        return ScaledAdamW(named, lr=lr, weight_decay=0.0, variant="official")
    extra = {"model": model} if optimizer == "peft_riemannian" else {}
    return build_optimizer(optimizer, named, lr=lr, weight_decay=0.0, **extra)


def run(optimizer: str, lr: float, seed: int, batch_size: int, steps: int, eval_every: int,
        sizes: tuple[int, int, int] = (2048, 256, 128)) -> dict[str, Any]:
    """One training run; returns the run record (eval curves and final figures)."""
    data = clip_data(*sizes)
    vision, projection = load_model(seed)
    named = [(n, p) for n, p in vision.named_parameters() if p.requires_grad]
    opt = build(optimizer, named, lr, vision)
    gen = torch.Generator().manual_seed(10_007 * seed + 1)
    n = len(data.train_y)
    order: list[int] = []
    record: dict[str, Any] = {"steps": [], "eval_loss": [], "eval_acc": [], "prior_drift": [], "train_loss": []}

    def evaluate(step: int) -> None:
        vision.eval()
        with torch.no_grad():
            logits = vision(pixel_values=data.eval_x).pooler_output @ data.head_w + data.head_b
            drift = (_embed(vision, projection, data.prior_x) - data.prior_base).pow(2).mean()
        vision.train()
        record["steps"].append(step)
        record["eval_loss"].append(float(F.cross_entropy(logits, data.eval_y)))
        record["eval_acc"].append(float((logits.argmax(1) == data.eval_y).float().mean()))
        record["prior_drift"].append(float(drift))

    t0 = time.perf_counter()
    vision.train()
    evaluate(0)
    diverged_at = None
    for step in range(1, steps + 1):
        while len(order) < batch_size:
            order += torch.randperm(n, generator=gen).tolist()
        idx, order = order[:batch_size], order[batch_size:]
        logits = vision(pixel_values=data.train_x[idx]).pooler_output @ data.head_w + data.head_b
        loss = F.cross_entropy(logits, data.train_y[idx])
        if not math.isfinite(loss.item()):
            diverged_at = step
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        record["train_loss"].append(loss.item())
        if not all(torch.isfinite(p).all() for _, p in named):
            diverged_at = step
            break
        if step % eval_every == 0:
            evaluate(step)
            if not math.isfinite(record["eval_loss"][-1]):
                diverged_at = step
                break
    record["seconds"] = round(time.perf_counter() - t0, 2)
    record["diverged_at"] = diverged_at
    return record
