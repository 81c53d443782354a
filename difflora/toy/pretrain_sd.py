"""Pretraining the toy Stable Diffusion (``assets/toy-sd``) on the toy world, and measuring it.

A randomly initialised UNet draws noise whatever the prompt, so DreamBooth on the tiny models can
only show that code runs. This module builds a real, small Stable Diffusion from stock diffusers
and transformers components, in the order the real one was made:

1. **Text encoder and tokenizer**: the text tower of the toy CLIP (``assets/toy-clip``), frozen,
   as SD 1.x uses OpenAI's CLIP-L text tower. It already tells colours and shapes apart.
2. **VAE**: an ``AutoencoderKL`` (downsampling by 4: 32 px images -> 4 x 8 x 8 latents) trained
   to reconstruct world scenes (L1 + MSE + a small KL term); its ``scaling_factor`` is set so the
   latents have unit standard deviation, as SD's 0.18215 does for its VAE.
3. **UNet**: a ``UNet2DConditionModel`` trained with the epsilon objective under SD 1.5's noise
   schedule on the frozen VAE's latents, conditioned on the frozen text encoder's last hidden
   states (77 tokens, padded like the pipeline does), with 10% empty captions so classifier-free
   guidance works. Two standard refinements make the most of a CPU budget: Min-SNR-gamma loss
   weighting (Hang et al. 2023; diffusers' ``compute_snr``), which stops the easy low-noise
   steps from dominating, and an exponential moving average of the weights (diffusers'
   ``EMAModel``), which is what gets saved. The first build had neither, and many of its initial
   noises ended in a shapeless blob on a mottled background.

The result is saved with ``StableDiffusionPipeline.save_pretrained`` (safetensors), so
``StableDiffusionPipeline.from_pretrained("assets/toy-sd")`` and every difflora job load it.
``evaluate_sd`` samples colour-shape prompts and asks the toy CLIP whether the image shows the
prompted colour and shape (top-1 over all 60 colour x shape prompts), for training and for
held-out combinations.

Time-bounded like the CLIP pretraining: the UNet's cosine schedule follows whichever of steps and
wall clock is further along, so a slower machine still ends annealed.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from difflora.errors import UserError
from difflora.toy.pretrain import (
    article,
    caption_variants,
    render_pool,
    retrieval_prompts,
    swap_in,
    write_lines,
)
from difflora.toy.world import HELD_OUT, SHAPES, ToyWorld, contrasting_colours


@dataclass
class SDPretrainConfig:
    """Everything that decides the toy Stable Diffusion (sizes, data, optimisation, time)."""

    out: str = "assets/toy-sd"
    clip: str = "assets/toy-clip"  # text tower + tokenizer come from here; also the judge
    seed: int = 0
    image_size: int = 32
    pool_size: int = 20000
    relation_prob: float = 0.15
    vae_steps: int = 800
    vae_batch_size: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    decoder_steps: int = 400  # decoder-only fine-tune after the UNet (latents unchanged); 0: none
    unet_channels: str = "64,128,128"
    unet_steps: int = 7500
    batch_size: int = 64
    lr: float = 5e-4
    warmup_steps: int = 200
    ema_decay: float = 0.999  # the saved UNet is this moving average of the weights; 0: the raw weights
    snr_gamma: float = 5.0  # Min-SNR-gamma loss weighting; 0: plain MSE
    unet_dtype: str = "float16"  # storage only (halves the file; loads as float32 unless asked otherwise)
    empty_caption_prob: float = 0.1
    max_minutes: float = 68.0  # the whole run, VAE included (with the CLIP's 22: 90 min at most)
    eval_every: int = 1000
    eval_samples: int = 4  # images per colour-shape prompt in the final measurement (0: skip it)
    threads: int = 2
    log: str = ""

    def channels(self) -> tuple[int, ...]:
        try:
            ch = tuple(int(c) for c in str(self.unet_channels).split(","))
        except ValueError:
            ch = ()
        if len(ch) < 2 or any(c % 32 for c in ch):
            raise UserError(f"unet_channels must be two or more multiples of 32 like 64,128,128, "
                            f"got '{self.unet_channels}'")
        return ch

    def validate(self) -> None:
        self.channels()
        if self.image_size % 32:
            raise UserError(f"image_size must be a multiple of 32, got {self.image_size}")
        if not (Path(self.clip) / "config.json").is_file():
            raise UserError(f"no toy CLIP at '{self.clip}'; build it first: python scripts/pretrain_toy.py clip")
        if self.batch_size < 1 or self.vae_batch_size < 1:
            raise UserError("batch sizes must be at least 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserError(f"ema_decay must be in [0, 1), got {self.ema_decay}; 0.999 is the default")
        if self.snr_gamma < 0:
            raise UserError(f"snr_gamma must be 0 (off) or positive, got {self.snr_gamma}")
        if self.unet_dtype not in ("float16", "float32"):
            raise UserError(f"unet_dtype must be float16 or float32, got '{self.unet_dtype}'")


# ----------------------------------------------------------------------------------------------
# Components
# ----------------------------------------------------------------------------------------------


def load_text_tower(clip_dir: str | Path):
    """(tokenizer, CLIPTextModel) from a CLIPModel folder: the toy CLIP's text half, frozen."""
    from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

    clip = CLIPModel.from_pretrained(clip_dir)
    text = CLIPTextModel(clip.config.text_config)
    # transformers 5 flattened CLIPTextModel (no inner ``text_model``); 4.x keeps one.
    target = getattr(text, "text_model", text)
    target.load_state_dict(clip.text_model.state_dict())
    text.requires_grad_(False).eval()
    return CLIPTokenizer.from_pretrained(clip_dir), text


def build_vae(image_size: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, norm_num_groups=32, sample_size=image_size,
    )


def build_unet(channels: tuple[int, ...], latent_size: int, cross_attention_dim: int):
    """A small SD-layout UNet: cross-attention at every level but the deepest, as SD 1.x has."""
    from diffusers import UNet2DConditionModel

    n = len(channels)
    down = ("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1)
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=channels, down_block_types=down, up_block_types=up,
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=32,
    )


def _to_pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _cosine(step: int, total: int, warmup: int, frac_time: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    frac = min(1.0, max((step - warmup) / max(1, total - warmup), frac_time))
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac))


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def train_vae(cfg: SDPretrainConfig, pool: np.ndarray, deadline: float, progress: bool = True):
    """Reconstruction training; returns the VAE with ``scaling_factor`` set and its last losses."""
    torch.manual_seed(cfg.seed)
    vae = build_vae(cfg.image_size)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    rng = np.random.default_rng(cfg.seed + 1)
    start = time.time()
    losses = []
    for step in tqdm(range(cfg.vae_steps), desc="toy VAE", disable=not progress, mininterval=5):
        if time.time() > deadline:
            break
        for g in opt.param_groups:
            g["lr"] = cfg.vae_lr * _cosine(step, cfg.vae_steps, 50, (time.time() - start) / max(1, deadline - start))
        x = _to_pixels(pool[rng.choice(len(pool), cfg.vae_batch_size, replace=False)])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + cfg.kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        sample = _to_pixels(pool[:512])
        std = float(vae.encode(sample).latent_dist.mean.std())
    vae.register_to_config(scaling_factor=1.0 / std)
    return vae, {"steps": len(losses), "final_loss": float(np.mean(losses[-20:])) if losses else float("nan"),
                 "latent_std": std}


def finetune_decoder(vae, pool: np.ndarray, steps: int, lr: float = 5e-4, batch_size: int = 32, seed: int = 0,
                     progress: bool = True) -> list[float]:
    """Train only the VAE's decoder on reconstructions from the frozen encoder's latent means.

    The encoder, hence every latent the UNet was trained on, stays as it is, so this can run after
    the UNet (as SD's ft-MSE VAE refined only its decoder). Returns the losses.
    """
    vae.requires_grad_(False)
    decoder = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in decoder:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(decoder, lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed + 5)
    losses = []
    vae.train()
    for step in tqdm(range(steps), desc="toy VAE decoder", disable=not progress, mininterval=5):
        for g in opt.param_groups:
            g["lr"] = lr * _cosine(step, steps, 20, 0.0)
        x = _to_pixels(pool[rng.choice(len(pool), batch_size, replace=False)])
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    vae.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def encode_pool(vae, pool: np.ndarray, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent means and standard deviations of every pool image (sampled afresh each step)."""
    means, stds = [], []
    for i in range(0, len(pool), batch):
        dist = vae.encode(_to_pixels(pool[i:i + batch])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


class _TextCache:
    """Caption -> last hidden state (77 tokens, padded as the pipeline pads), computed once."""

    def __init__(self, tokenizer, text_encoder) -> None:
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if missing:
            ids = self.tokenizer(missing, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            hidden = self.text_encoder(ids)[0]
            self.cache.update(zip(missing, hidden))
        return torch.stack([self.cache[c] for c in captions])


def pretrain_sd(cfg: SDPretrainConfig, progress: bool = True) -> dict:
    """Train VAE then UNet, save the pipeline to ``cfg.out`` (atomically) and measure it."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from diffusers.training_utils import EMAModel, compute_snr

    from difflora.tiny_models import tiny_scheduler

    cfg.validate()
    torch.set_num_threads(cfg.threads)
    started = time.time()
    deadline = started + cfg.max_minutes * 60
    tokenizer, text_encoder = load_text_tower(cfg.clip)
    world = ToyWorld(seed=cfg.seed, size=cfg.image_size, split="train", relation_prob=cfg.relation_prob)
    pool, scenes = render_pool(world, cfg.pool_size, progress)
    variants = [caption_variants(s) for s in scenes]
    vae_deadline = started + 0.25 * cfg.max_minutes * 60
    vae, vae_summary = train_vae(cfg, pool, vae_deadline, progress)
    means, stds = encode_pool(vae, pool)
    scale = vae.config.scaling_factor

    latent_size = cfg.image_size // 4
    torch.manual_seed(cfg.seed + 2)
    unet = build_unet(cfg.channels(), latent_size, text_encoder.config.hidden_size)
    noise_scheduler = DDPMScheduler.from_config(tiny_scheduler("epsilon").config)
    text = _TextCache(tokenizer, text_encoder)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.01)
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay) if cfg.ema_decay > 0 else None
    rng = np.random.default_rng(cfg.seed + 3)
    pyrng = random.Random(cfg.seed + 3)
    gen = torch.Generator().manual_seed(cfg.seed + 4)
    history, recent = [], []
    log = open(cfg.log, "a") if cfg.log else None
    unet_start = time.time()
    bar = tqdm(range(cfg.unet_steps), desc="toy UNet", disable=not progress, mininterval=5)
    steps_done = 0
    unet.train()
    for step in bar:
        now = time.time()
        if now > deadline:
            break
        for g in opt.param_groups:
            g["lr"] = cfg.lr * _cosine(step, cfg.unet_steps, cfg.warmup_steps,
                                       (now - unet_start) / max(1, deadline - unet_start))
        idx = rng.choice(len(pool), cfg.batch_size, replace=False)
        idx_t = torch.from_numpy(idx)
        latents = (means[idx_t] + stds[idx_t] * torch.randn(means[idx_t].shape, generator=gen)) * scale
        captions = ["" if pyrng.random() < cfg.empty_caption_prob else pyrng.choice(variants[i]) for i in idx]
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=text(captions)).sample
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        if cfg.snr_gamma > 0:  # epsilon target: weight min(SNR, gamma) / SNR
            snr = compute_snr(noise_scheduler, t)
            loss = (per_sample * snr.clamp(max=cfg.snr_gamma) / snr).mean()
        else:
            loss = per_sample.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        if ema is not None:
            ema.step(unet.parameters())
        recent.append(per_sample.mean().item())
        steps_done = step + 1
        if steps_done % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(recent[-50:]):.4f}")
        if steps_done % cfg.eval_every == 0:
            rec = {"step": steps_done, "loss": round(float(np.mean(recent[-cfg.eval_every:])), 4),
                   "minutes": round((time.time() - started) / 60, 2)}
            history.append(rec)
            if log:
                log.write(json.dumps(rec) + "\n")
                log.flush()
    if log:
        log.close()
    if ema is not None:
        ema.copy_to(unet.parameters())
    unet.eval()
    if cfg.decoder_steps > 0:
        dec = finetune_decoder(vae, pool, cfg.decoder_steps, seed=cfg.seed, progress=progress)
        vae_summary["decoder_steps"], vae_summary["decoder_final_loss"] = len(dec), float(np.mean(dec[-20:]))
    train_minutes = round((time.time() - started) / 60, 2)

    out = Path(cfg.out)
    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=tiny_scheduler("epsilon"), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    unet.to(getattr(torch, cfg.unet_dtype))  # storage only: diffusers loads it as float32 by default
    pipe.save_pretrained(staging, safe_serialization=True)
    unet.to(torch.float32)
    summary = {"vae": vae_summary, "unet": {"steps": steps_done, "final_loss": float(np.mean(recent[-100:])),
                                            "history": history},
               "minutes": train_minutes, "config": asdict(cfg), "output_dir": str(out)}
    if cfg.eval_samples > 0:
        summary["eval"] = evaluate_sd(staging, cfg.clip, samples=cfg.eval_samples, seed=cfg.seed)
    (staging / "pretrain_summary.json").write_text(json.dumps(summary, indent=1))
    swap_in(staging, out)
    return summary


# ----------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------


def colour_shape_pairs(held_out: bool, background: str = "white") -> list[tuple[str, str]]:
    """(colour, shape) pairs drawable on ``background``: the held-out ones, or the training ones."""
    held = set(HELD_OUT)
    return [(c, s) for c in contrasting_colours(background) for s in SHAPES if ((c, s) in held) == held_out]


@torch.no_grad()
def evaluate_sd(model_dir: str | Path, clip_dir: str | Path, samples: int = 2, seed: int = 0,
                steps: int = 25, guidance: float = 4.0, progress: bool = True) -> dict:
    """Share of samples whose toy-CLIP top-1 colour-shape prompt is the prompted one.

    Prompts: ``"a {colour} {shape} on a white background"`` for every training pair and every
    held-out pair (pairs the UNet never saw together); ``samples`` seeds each; candidates for
    the judge: all 60 ``"a {colour} {shape}"`` prompts.
    """
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPModel, CLIPTokenizer

    from difflora.toy.pretrain import Tokens, embed_images, embed_text

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    judge = CLIPModel.from_pretrained(clip_dir).eval()
    cands, cand_pairs = retrieval_prompts()
    txt = embed_text(judge, Tokens(CLIPTokenizer.from_pretrained(clip_dir))(cands))
    size = judge.config.vision_config.image_size
    result: dict = {"samples_per_prompt": samples, "steps": steps, "guidance": guidance}
    for split, held in (("train", False), ("held_out", True)):
        pairs = colour_shape_pairs(held)
        hits = colour = shape = 0
        for k, (c, s) in enumerate(tqdm(pairs, desc=f"judge {split}", disable=not progress, mininterval=5)):
            prompt = f"{article(c)} {c} {s} on a white background"
            gen = torch.Generator().manual_seed(seed * 1000 + k)
            imgs = pipe([prompt] * samples, num_inference_steps=steps, guidance_scale=guidance, generator=gen,
                        output_type="np").images
            pix = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() * 2 - 1
            if pix.shape[-1] != size:
                pix = F.interpolate(pix, size=(size, size), mode="bicubic", align_corners=False)
            best = (embed_images(judge, pix) @ txt.t()).argmax(1).tolist()
            for b in best:
                bc, bs = cand_pairs[b]
                hits += (bc, bs) == (c, s)
                colour += bc == c
                shape += bs == s
        n = samples * len(pairs)
        result[split] = {"match": hits / n, "colour": colour / n, "shape": shape / n, "n": n}
    return result


def main(argv: list[str] | None = None) -> dict:
    """``pretrain_toy.py sd --out DIR [--key value ...]``: rebuild the toy Stable Diffusion."""
    from difflora.config import parse_config

    cfg = parse_config(SDPretrainConfig, argv or [], prog="pretrain_toy.py sd")
    summary = pretrain_sd(cfg, progress=True)
    ev = summary.get("eval")
    if ev is None:
        print(f"toy SD: UNet {summary['unet']['steps']} steps in {summary['minutes']} min -> {cfg.out}")
        return summary
    print(f"toy SD: VAE {summary['vae']['steps']} steps, UNet {summary['unet']['steps']} steps in "
          f"{summary['minutes']} min; toy-CLIP match {ev['train']['match']:.3f} (training pairs), "
          f"{ev['held_out']['match']:.3f} (held-out pairs) -> {cfg.out}")
    return summary


def write_report(summary: dict, path: str | Path, notes: str = "") -> Path:
    """The measurements of one toy-SD pretraining run as a markdown table (benchmarks/results)."""
    cfg, ev, vae, unet = summary["config"], summary["eval"], summary["vae"], summary["unet"]
    lines = [
        "# Toy Stable Diffusion pretraining",
        "",
        f"`python scripts/pretrain_toy.py sd --out {cfg['out']}` (seed {cfg['seed']}, {cfg['threads']} threads on a "
        f"2-core machine): {summary['minutes']} min in all. VAE: {vae['steps']} steps of batch "
        f"{cfg['vae_batch_size']}, final loss {vae['final_loss']:.4f}, latent std {vae['latent_std']:.3f} "
        f"(scaling_factor {1 / vae['latent_std']:.3f}). UNet (channels {cfg['unet_channels']}): {unet['steps']} "
        f"steps of batch {cfg['batch_size']}, final loss {unet['final_loss']:.4f}.",
        "",
        f"Judged by the toy CLIP: for every 'a {{colour}} {{shape}} on a white background' prompt, "
        f"{ev['samples_per_prompt']} samples ({ev['steps']} DDIM steps, guidance {ev['guidance']}); a sample "
        "matches when the judge's top-1 of all 60 colour x shape prompts is the prompted one.",
        "",
        "| prompts | samples | colour + shape match | colour right | shape right |",
        "|---|---|---|---|---|",
    ]
    for split, label in (("train", "training pairs"), ("held_out", "held-out pairs (never seen together)")):
        r = ev[split]
        lines.append(f"| {label} | {r['n']} | {r['match']:.3f} | {r['colour']:.3f} | {r['shape']:.3f} |")
    lines += ["", "UNet training loss (mean over each interval):", "", "| step | minutes | loss |", "|---|---|---|"]
    lines += [f"| {h['step']} | {h['minutes']} | {h['loss']} |" for h in unet.get("history", [])]
    if notes:
        lines += ["", notes.strip()]
    return write_lines(lines, path)
