"""Pretraining the toy CLIP that judges the toy world, and measuring it.

A randomly initialised CLIP cannot tell a red circle from a blue star, so CLIP-T / CLIP-I on the
tiny models only prove that code runs. This module trains a small transformers ``CLIPModel`` on
captioned :class:`~difflora.toy.ToyWorld` scenes (symmetric InfoNCE, learnable temperature) and
saves it as a normal ``CLIPModel`` + ``CLIPProcessor`` folder, so ``from_pretrained`` and
:func:`difflora.evaluation.score_images` use it unchanged.

Choices that matter for telling colours and shapes apart:

* Mostly single-object scenes (``relation_prob`` small): each image's colour and shape is then
  unambiguous, and every batch holds many same-colour / same-shape hard negatives.
* Caption variants: each scene is trained with its full caption and shorter ones ("a red circle",
  "a small red circle", "a red circle on a white background"), so short prompts work too.
* Shape-only variants ("a circle", "a small circle"): every circle in a batch, whatever its colour,
  is then a positive for them, which pushes the image features to hold shape apart from colour.
  Without them the first build recognised shapes of unseen colour-shape pairs only 75% of the time
  (colour 99.9%).
* Recoloured shapes: a share of single-object images get their colour channels permuted (a
  yellow cross turns cyan or magenta) and only a shape-only caption. With shape-only captions
  alone the vision tower still learned colour-shape conjunctions (unseen yellow crosses were
  called squares a quarter of the time); recolouring makes a shape the same shape in any colour.
* Multi-positive targets: a short caption such as "a red circle" describes every red circle in
  the batch, so all of those pairs are positives (soft targets) instead of false negatives.

Reproducible: the same config and seed rebuild the same data; the shipped ``assets/toy-clip`` is
the output of ``python scripts/pretrain_toy.py clip --out assets/toy-clip``.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from difflora.errors import UserError
from difflora.toy.world import COLOURS, HELD_OUT, SHAPES, Scene, ToyWorld, render

# Pixels are scaled to [-1, 1] in training; the saved processor normalises the same way.
IMAGE_MEAN = [0.5, 0.5, 0.5]
IMAGE_STD = [0.5, 0.5, 0.5]


@dataclass
class ClipPretrainConfig:
    """Everything that decides the toy CLIP (model size, data, optimisation, time budget)."""

    out: str = "assets/toy-clip"
    seed: int = 0
    image_size: int = 32
    patch_size: int = 4
    hidden: int = 64
    vision_layers: int = 4  # 2 layers recognised shapes of unseen pairs only 75% of the time
    text_layers: int = 2
    heads: int = 4
    projection_dim: int = 64
    pool_size: int = 40000  # scenes rendered once up front and sampled from
    relation_prob: float = 0.15  # share of two-object scenes in the pool
    recolour_prob: float = 0.25  # share of single-object images recoloured, with a shape-only caption
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    max_steps: int = 5000
    max_minutes: float = 22.0  # stop earlier if the wall clock runs out (the LR schedule follows)
    eval_every: int = 250
    eval_images: int = 300
    threads: int = 2
    log: str = ""  # JSON lines of periodic measurements, if set

    def validate(self) -> None:
        if self.image_size % self.patch_size:
            raise UserError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}; "
                            "pick matching values")
        if self.batch_size < 2:
            raise UserError("batch_size must be at least 2 for contrastive training; raise --batch-size")
        for key in ("relation_prob", "recolour_prob"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise UserError(f"{key} must be in [0, 1], got {getattr(self, key)}")


# ----------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------


def article(phrase: str) -> str:
    return "an" if phrase[0] in "aeiou" else "a"


def caption_variants(scene: Scene) -> list[str]:
    """The full caption first, then shorter true descriptions of the same scene.

    Two-object scenes keep only the full caption: dropping one object would make the caption
    ambiguous about which object is meant.
    """
    full = scene.caption
    if len(scene.objects) != 1:
        return [full]
    obj = scene.objects[0]
    core = " ".join(w for w in (obj.colour, obj.shape))
    sized = " ".join(w for w in (obj.size, obj.colour, obj.shape) if w)
    out = [full, f"{article(core)} {core}", f"{article(sized)} {sized}",
           f"{article(core)} {core} on a {scene.background} background", *shape_variants(scene)]
    return list(dict.fromkeys(out))


def shape_variants(scene: Scene) -> list[str]:
    """Captions that name only the shape ("a star", "a small star") of a single-object scene."""
    if len(scene.objects) != 1:
        return []
    obj = scene.objects[0]
    out = [f"{article(obj.shape)} {obj.shape}"]
    if obj.size:
        out.append(f"{article(obj.size)} {obj.size} {obj.shape}")
    return out


# The five channel orders other than RGB itself: recolouring that keeps every shape's outline.
_RECOLOURINGS = ((0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))


def retrieval_prompts() -> tuple[list[str], list[tuple[str, str]]]:
    """Every ``"a {colour} {shape}"`` prompt (all colours x all shapes) and its (colour, shape)."""
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    return [f"{article(c)} {c} {s}" for c, s in pairs], pairs


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


def build_toy_clip(cfg: ClipPretrainConfig, vocab_size: int):
    """A freshly initialised CLIPModel of the toy size (token ids as the tiny tokenizer's)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    text = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden, intermediate_size=4 * cfg.hidden,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.heads, max_position_embeddings=77,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
        projection_dim=cfg.projection_dim,
    )
    vision = CLIPVisionConfig(
        hidden_size=cfg.hidden, intermediate_size=4 * cfg.hidden, num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
        projection_dim=cfg.projection_dim,
    )
    torch.manual_seed(cfg.seed)
    return CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                projection_dim=cfg.projection_dim))


def make_processor(tokenizer, image_size: int = 32):
    """CLIPProcessor whose image half reproduces the training pixels ([-1, 1], no crop change)."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        do_normalize=True, image_mean=IMAGE_MEAN, image_std=IMAGE_STD,
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], as the saved processor produces."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


class Tokens:
    """Caption -> token ids, cached (the slow tokenizer would dominate a small step)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.pad = tokenizer.pad_token_id
        self.cache: dict[str, list[int]] = {}

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        ids = []
        for c in captions:
            if c not in self.cache:
                self.cache[c] = self.tokenizer(c, truncation=True, max_length=77)["input_ids"]
            ids.append(self.cache[c])
        n = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), n), self.pad, dtype=torch.long)
        mask = torch.zeros((len(ids), n), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}


def _features(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    return out.pooler_output if getattr(out, "pooler_output", None) is not None else out[0]


def embed_images(model, pixels: torch.Tensor) -> torch.Tensor:
    return F.normalize(_features(model.get_image_features(pixel_values=pixels)), dim=-1)


def embed_text(model, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.normalize(_features(model.get_text_features(**tokens)), dim=-1)


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, positives: torch.Tensor,
                     logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with several positives per row (soft targets spread over them)."""
    logits = logit_scale.exp() * img @ txt.t()
    pos = positives.float()
    t_i = pos / pos.sum(1, keepdim=True)
    t_t = pos.t() / pos.t().sum(1, keepdim=True)
    loss_i = -(t_i * F.log_softmax(logits, dim=1)).sum(1).mean()
    loss_t = -(t_t * F.log_softmax(logits.t(), dim=1)).sum(1).mean()
    return (loss_i + loss_t) / 2


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def render_pool(world: ToyWorld, n: int, progress: bool = True) -> tuple[np.ndarray, list[Scene]]:
    """``n`` scenes of ``world`` rendered once as uint8 (n, H, W, 3)."""
    images = np.empty((n, world.size, world.size, 3), dtype=np.uint8)
    scenes = []
    for i in tqdm(range(n), desc=f"render {world.split}", disable=not progress, mininterval=2):
        scene = world.scene(i)
        images[i] = np.asarray(render(scene, world.size))
        scenes.append(scene)
    return images, scenes


def single_object_set(seed: int, split: str, n: int, size: int = 32) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """``n`` single-object scenes of a split (images + their (colour, shape)), for retrieval tests."""
    world = ToyWorld(seed=seed, size=size, split=split, relation_prob=0.0)
    images, scenes = render_pool(world, n, progress=False)
    return images, [(s.objects[0].colour, s.objects[0].shape) for s in scenes]


@torch.no_grad()
def retrieval_accuracy(model, tokens: Tokens, images: np.ndarray,
                       labels: list[tuple[str, str]]) -> dict[str, float]:
    """Top-1 accuracy of ranking all 'a {colour} {shape}' prompts for each image.

    Also the share of images whose top prompt has the right colour, and the right shape.
    """
    prompts, pairs = retrieval_prompts()
    was_training = model.training
    model.eval()
    txt = embed_text(model, tokens(prompts))
    img = torch.cat([embed_images(model, _to_pixels(images[i:i + 256])) for i in range(0, len(images), 256)])
    best = (img @ txt.t()).argmax(1).tolist()
    model.train(was_training)
    top = [pairs[b] for b in best]
    n = max(1, len(labels))
    return {
        "top1": sum(t == y for t, y in zip(top, labels)) / n,
        "colour": sum(t[0] == y[0] for t, y in zip(top, labels)) / n,
        "shape": sum(t[1] == y[1] for t, y in zip(top, labels)) / n,
        "n": len(labels),
    }


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def _lr_at(step: int, cfg: ClipPretrainConfig, time_frac: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to 5% of ``lr``.

    Progress is the larger of steps done / ``max_steps`` and time used / ``max_minutes``, so a slow
    machine still anneals before its time runs out (a fast one follows the step count exactly).
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = max((step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps), time_frac)
    frac = min(1.0, frac)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))


def pretrain_clip(cfg: ClipPretrainConfig, progress: bool = True, log_file: str | Path | None = None) -> dict:
    """Train the toy CLIP, save it to ``cfg.out`` and return its measurements.

    The cosine schedule is planned for ``max_steps``; if ``max_minutes`` is reached first,
    training stops there (the summary says how many steps ran).
    """
    from transformers import CLIPTokenizer

    from difflora.tiny_models import write_clip_tokenizer

    cfg.validate()
    torch.set_num_threads(cfg.threads)
    started = time.time()
    out = Path(cfg.out)
    tmp = out.with_name(out.name + ".tmp")
    tok_dir = write_clip_tokenizer(tmp / "_tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    tokens = Tokens(tokenizer)
    model = build_toy_clip(cfg, len(tokenizer))

    world = ToyWorld(seed=cfg.seed, size=cfg.image_size, split="train", relation_prob=cfg.relation_prob)
    pool, scenes = render_pool(world, cfg.pool_size, progress)
    variants = [caption_variants(s) for s in scenes]
    shape_only = [shape_variants(s) for s in scenes]
    val_images, val_labels = single_object_set(cfg.seed + 1000, "held_out", cfg.eval_images, cfg.image_size)
    render_s = time.time() - started

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    rng = np.random.default_rng(cfg.seed)
    pyrng = random.Random(cfg.seed)
    log = open(log_file, "a") if log_file else None
    history = []
    train_start = time.time()
    deadline = started + cfg.max_minutes * 60
    bar = tqdm(range(cfg.max_steps), desc="toy CLIP", disable=not progress, mininterval=5)
    steps_done = 0
    loss_value = float("nan")
    model.train()
    for step in bar:
        if time.time() > deadline:
            break
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg, (time.time() - train_start) / max(1e-9, deadline - train_start))
        idx = rng.choice(len(pool), size=cfg.batch_size, replace=False)
        batch = pool[idx]
        flip = rng.random(len(idx)) < 0.5
        recolour = rng.random(len(idx)) < cfg.recolour_prob
        allowed = []
        for j, i in enumerate(idx):  # a mirrored single object keeps its caption
            if flip[j] and len(scenes[i].objects) == 1:
                batch[j] = batch[j][:, ::-1]
            if recolour[j] and shape_only[i]:  # recoloured: now only its shape is described
                batch[j] = batch[j][..., list(_RECOLOURINGS[rng.integers(len(_RECOLOURINGS))])]
                allowed.append(shape_only[i])
            else:
                allowed.append(variants[i])
        captions = [pyrng.choice(a) for a in allowed]
        allowed = [set(a) for a in allowed]
        positives = torch.tensor([[c in a for c in captions] for a in allowed])
        img = embed_images(model, _to_pixels(batch))
        txt = embed_text(model, tokens(captions))
        loss = contrastive_loss(img, txt, positives, model.logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        loss_value = float(loss.detach())
        steps_done = step + 1
        if (step + 1) % cfg.eval_every == 0:
            acc = retrieval_accuracy(model, tokens, val_images, val_labels)
            rec = {"step": step + 1, "loss": round(loss_value, 4), "held_out_top1": round(acc["top1"], 4),
                   "temperature": round(1 / float(model.logit_scale.exp()), 4),
                   "minutes": round((time.time() - started) / 60, 2)}
            history.append(rec)
            bar.set_postfix(loss=f"{loss_value:.3f}", held_out=f"{acc['top1']:.2f}")
            if log:
                log.write(json.dumps(rec) + "\n")
                log.flush()
    train_s = time.time() - started
    if log:
        log.close()

    save_toy_clip(model, tokenizer, out, cfg.image_size)
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    summary = {"steps": steps_done, "final_loss": loss_value, "minutes": round(train_s / 60, 2),
               "render_seconds": round(render_s, 1), "config": asdict(cfg), "history": history,
               "output_dir": str(out)}
    summary["eval"] = evaluate_clip(out)
    (out / "pretrain_summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def save_toy_clip(model, tokenizer, out: Path, image_size: int = 32) -> None:
    """Write model + processor next to ``out`` first, then swap it in (a crash leaves the old one)."""
    import shutil

    out = Path(out)
    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    make_processor(tokenizer, image_size).save_pretrained(staging)
    swap_in(staging, out)


def swap_in(staging: Path, out: Path) -> None:
    """Replace ``out`` by the complete folder ``staging`` (a crash leaves the old or the new one)."""
    import shutil

    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out)


def evaluate_clip(model_dir: str | Path, seed: int = 12345, n: int = 1200) -> dict:
    """Held-out and training-combination top-1 retrieval of a saved toy CLIP, on fresh scenes.

    The images come from a world seed the training never used; held-out (colour, shape) pairs
    never appeared in training at all. Candidates: every colour x shape prompt (60).
    """
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(model_dir).eval()
    tokens = Tokens(CLIPTokenizer.from_pretrained(model_dir))
    result = {"seed": seed, "candidates": len(retrieval_prompts()[0]), "held_out_pairs": [list(p) for p in HELD_OUT]}
    for split in ("held_out", "train"):
        images, labels = single_object_set(seed, split, n)
        result[split] = retrieval_accuracy(model, tokens, images, labels)
    return result


def main(argv: list[str] | None = None) -> dict:
    """``pretrain_toy.py clip --out DIR [--key value ...]``: rebuild the toy CLIP from its seed."""
    from difflora.config import parse_config

    cfg = parse_config(ClipPretrainConfig, argv or [], prog="pretrain_toy.py clip")
    summary = pretrain_clip(cfg, progress=True, log_file=cfg.log or None)
    ev = summary["eval"]
    print(f"toy CLIP: {summary['steps']} steps in {summary['minutes']} min; held-out top-1 "
          f"{ev['held_out']['top1']:.3f}, training combos top-1 {ev['train']['top1']:.3f} -> {cfg.out}")
    return summary


def write_report(summary: dict, path: str | Path, notes: str = "") -> Path:
    """The measurements of one pretraining run as a markdown table (benchmarks/results)."""
    cfg, ev = summary["config"], summary["eval"]
    lines = [
        "# Toy CLIP pretraining",
        "",
        f"`python scripts/pretrain_toy.py clip --out {cfg['out']}` (seed {cfg['seed']}), {cfg['threads']} CPU "
        f"thread(s) on a 2-core machine: {summary['steps']} steps of batch {cfg['batch_size']} in {summary['minutes']} min "
        f"({summary['render_seconds']} s of it rendering {cfg['pool_size']} scenes); final training loss "
        f"{summary['final_loss']:.3f}.",
        "",
        f"Top-1 retrieval over all {ev['candidates']} 'a {{colour}} {{shape}}' prompts, fresh single-object scenes "
        f"of world seed {ev['seed']} (never used in training):",
        "",
        "| scenes | images | top-1 (colour + shape) | colour right | shape right |",
        "|---|---|---|---|---|",
    ]
    for split, label in (("held_out", "held-out (colour, shape) pairs"), ("train", "training pairs")):
        r = ev[split]
        lines.append(f"| {label} | {r['n']} | {r['top1']:.3f} | {r['colour']:.3f} | {r['shape']:.3f} |")
    lines += ["", f"Held-out pairs: {', '.join(' '.join(p) for p in ev['held_out_pairs'])}. Chance: 1/60 = 0.017.",
              "", "Training curve (held-out top-1 on 300 held-out scenes of another seed):", "",
              "| step | minutes | loss | held-out top-1 | temperature |", "|---|---|---|---|---|"]
    for h in summary.get("history", []):
        lines.append(f"| {h['step']} | {h['minutes']} | {h['loss']} | {h['held_out_top1']} | {h['temperature']} |")
    if notes:
        lines += ["", notes.strip()]
    return write_lines(lines, path)


def write_lines(lines: list[str], path: str | Path) -> Path:
    """A markdown report, one line per entry (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path
