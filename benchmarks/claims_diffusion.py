"""The diffusion settings of benchmarks/claims.py: DreamBooth and ED-LoRA on the toy Stable Diffusion.

Both train through difflora's own trainers (``difflora.train.dreambooth.train`` and
``difflora.mix_of_show.edlora.train``) with a callback that the trainers call after step 0 and
after every optimizer step; every ``eval_every`` steps :class:`DiffusionJudge` measures, under
``torch.no_grad()`` and in eval mode (train mode is restored afterwards):

* concept fit (``eval_loss``): the denoising loss (MSE against the noise target) on the concept's
  five images under held-out views -- two 56/64 crops (top-left, bottom-right) each unflipped and
  flipped -- with two captions training never uses ("a sks star", "a large sks star on a {bg}
  background"), three fixed timesteps per item (one in each third of the schedule) and fixed
  noise: 5 x 4 x 2 x 3 = 120 denoising problems, identical for every run;
* prior drift (``prior_drift``): the mean squared difference between the adapted and the base
  model's predictions on 16 fixed toy-world scenes with their own captions (no concept word), at 2
  fixed timesteps each; the base predictions are the model's own at step 0 (LoRA starts with
  B = 0, so the model then is the base model). ``prior_loss`` is the denoising loss on the same
  inputs.

The inputs are a function of fixed seeds and the images only (latents are the VAE posterior
means), so the judge is deterministic given the run, and runs with the same seed (data order,
noise, timesteps, LoRA initialisation: all seeded by the trainer from ``seed``) are paired across
optimizers.
"""

from __future__ import annotations

import math
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
TOY_SD = ROOT / "assets" / "toy-sd"
CONCEPT = ROOT / "assets" / "concepts" / "checkered_star"
CLIP = ROOT / "assets" / "toy-clip"
EDLORA_WORDS = "<checkered1>+<checkered2>"
EVAL_SEED, PRIOR_WORLD_SEED = 4242, 505
RESOLUTION = 32
CROPS = ((0, 0, 56, 56), (8, 8, 64, 64))
SAMPLE_PROMPTS = ("a {} on a black background", "a {} left of a blue circle on a white background")


def trainer_has_callbacks() -> bool:
    """Whether both trainers take ``callbacks=`` (the hook these settings need)."""
    import inspect

    from difflora.mix_of_show import edlora
    from difflora.train import dreambooth

    def takes(fn: Any) -> bool:
        fn = inspect.unwrap(fn)
        return "callbacks" in inspect.signature(fn).parameters

    return takes(dreambooth.train) and takes(edlora.train)


def held_out_captions(caption: str, concept: str) -> list[str]:
    """The two captions of a training caption ``a sks star on a {bg} background`` that training never uses."""
    return [f"a {concept}", caption.replace(f"a {concept}", f"a large {concept}", 1)]


class DiffusionJudge:
    """Concept fit and prior drift of the model a trainer is training (see the module docstring)."""

    def __init__(self, trainer: Any, resolution: int, words: str = "sks", n_prior: int = 16, per_item: int = 3,
                 prior_per_item: int = 2):
        from PIL import Image, ImageOps

        from difflora.data import load_image, read_caption, to_tensor
        from difflora.toy.world import ToyWorld, render

        self.trainer, self.resolution = trainer, resolution
        base = trainer.base
        res = resolution
        gen = torch.Generator().manual_seed(EVAL_SEED)
        num_t = base.noise_scheduler.config.num_train_timesteps
        pixels, prompts = [], []
        for path in sorted(CONCEPT.glob("*.png")):
            image = load_image(path)
            caption = read_caption(path, "a sks star")
            for box in CROPS:
                view = image.crop(box).resize((res, res), Image.Resampling.BICUBIC)
                for flip in (False, True):
                    px = to_tensor(ImageOps.mirror(view) if flip else view)
                    for text in held_out_captions(caption, "sks star"):
                        pixels.append(px)
                        prompts.append(text.replace("sks", words))
        world = ToyWorld(seed=PRIOR_WORLD_SEED, size=res, split="all", relation_prob=0.3)
        prior_pixels = [to_tensor(render(world.scene(i), res)) for i in range(n_prior)]
        prior_prompts = world.prompts(n_prior)
        self.concept = self._problems(pixels, prompts, per_item, num_t, gen)
        self.prior = self._problems(prior_pixels, prior_prompts, prior_per_item, num_t, gen)
        self.base_prior_pred: torch.Tensor | None = None

    def _problems(self, pixels: list[torch.Tensor], prompts: list[str], per_item: int, num_t: int,
                  gen: torch.Generator) -> dict[str, Any]:
        """Noisy latents, timesteps, targets and prompts: ``per_item`` stratified timesteps per item."""
        tr = self.trainer
        vae, sched = tr.base.vae, tr.base.noise_scheduler
        with torch.no_grad():
            x = torch.stack(pixels).to(vae.device, vae.dtype)
            latents = vae.encode(x).latent_dist.mean.float()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latents = (latents - shift) * vae.config.scaling_factor
        latents = latents.repeat_interleave(per_item, dim=0)
        n = len(pixels)
        strata = torch.arange(per_item).repeat(n)
        t = ((strata + torch.rand(n * per_item, generator=gen)) * num_t / per_item).long().clamp(0, num_t - 1)
        noise = torch.randn(latents.shape, generator=gen)
        from difflora.train.loss import target_for

        noisy = sched.add_noise(latents, noise, t)
        target = target_for(sched, latents, noise, t)
        return {"noisy": noisy, "t": t, "target": target.float(),
                "prompts": [p for p in prompts for _ in range(per_item)]}

    def _predict(self, problems: dict[str, Any]) -> torch.Tensor:
        tr = self.trainer
        device, dtype = tr.device, tr.weight_dtype
        unique = list(dict.fromkeys(problems["prompts"]))
        cond = tr.job.conditioning(unique, tr.text_encoders, device)
        where = {p: i for i, p in enumerate(unique)}
        idx = [where[p] for p in problems["prompts"]]
        hidden = cond.hidden_states[idx]
        n = len(idx)
        extra: dict[str, Any] = {}
        family = getattr(tr.base, "family", None)
        res = self.resolution
        if family is not None:
            sel = cond.select(idx)
            extra = family.unet_kwargs(sel, [(res, res)] * n, [(0, 0)] * n, (res, res), dtype, device)
        out = tr.unet(problems["noisy"].to(device, dtype), problems["t"].to(device), hidden.to(dtype), **extra).sample
        return out.float().cpu()

    def __call__(self) -> dict[str, float]:
        """Concept fit, prior drift and prior loss of the model as it is now."""
        tr = self.trainer
        modules = [tr.unet, *tr.text_encoders]
        modes = [m.training for m in modules]
        for m in modules:
            m.eval()
        try:
            with torch.no_grad():
                concept = self._predict(self.concept)
                prior = self._predict(self.prior)
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)
        if self.base_prior_pred is None:
            self.base_prior_pred = prior.clone()
        return {"eval_loss": float((concept - self.concept["target"]).pow(2).mean()),
                "prior_drift": float((prior - self.base_prior_pred).pow(2).mean()),
                "prior_loss": float((prior - self.prior["target"]).pow(2).mean())}


def clip_scores(trainer: Any, resolution: int, words: str, seeds: tuple[int, ...] = (0, 1, 2, 3), steps: int = 20,
                guidance: float = 4.0) -> dict[str, float]:
    """Secondary: CLIP-I / CLIP-T (toy CLIP) of samples of the concept in two new contexts."""
    from difflora.evaluation import load_images, score_images

    tr = trainer
    modules = [tr.unet, *tr.text_encoders]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        with torch.no_grad():
            pipe = tr.job.validation_pipeline(tr.unet, list(tr.text_encoders))
            pipe.set_progress_bar_config(disable=True)
            res = resolution
            images, texts = [], []
            for template in SAMPLE_PROMPTS:
                prompt = template.format(words)
                gens = [torch.Generator().manual_seed(seed) for seed in seeds]
                images += pipe(prompt, num_images_per_prompt=len(seeds), num_inference_steps=steps,
                               guidance_scale=guidance, height=res, width=res, generator=gens).images
                texts += [template.format("star")] * len(seeds)  # the trigger word means nothing to the toy CLIP
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
    return score_images(images, texts, load_images(CONCEPT), str(CLIP))


def _argv(options: dict[str, Any]) -> list[str]:
    return [f"{k}={v}" for k, v in options.items() if v is not None]


def dreambooth_options(optimizer: str, lr: float, seed: int, batch_size: int, steps: int, out: Path) -> dict:
    """DreamBooth of the checkered star on the toy SD: UNet attention LoRA rank 4, as the toy sweep."""
    return dict(pretrained_model_name_or_path=TOY_SD, instance_data_dir=CONCEPT, instance_prompt="a sks star",
                captions=True, resolution=RESOLUTION, rank=4, lora_targets="attention", optimizer=optimizer,
                learning_rate=lr, train_batch_size=batch_size, max_train_steps=steps, lr_scheduler="constant",
                max_grad_norm=0.0, adam_weight_decay=0.0, cache_latents=True, checkpointing_steps=100_000,
                lr_warmup_steps=0, report_to="none", num_validation_images=0, seed=seed, output_dir=out,
                overwrite=True)


def edlora_options(optimizer: str, lr: float, seed: int, batch_size: int, steps: int, out: Path) -> dict:
    """ED-LoRA of the checkered star: Mix-of-Show's learning-rate ratios (embeddings 10x, text encoder
    0.1x the UNet lr ``lr``), rank 4 on text-encoder and UNet attention."""
    return dict(pretrained_model_name_or_path=TOY_SD, concept_words=EDLORA_WORDS, initializer="rand+star",
                instance_data_dir=CONCEPT, captions=True, caption_placeholder="sks", instance_prompt="a sks",
                resolution=RESOLUTION, rank=4, optimizer=optimizer, embedding_lr=10 * lr, text_encoder_lr=lr / 10,
                unet_lr=lr, adam_weight_decay=0.0, max_grad_norm=0.0, train_batch_size=batch_size,
                max_train_steps=steps, checkpointing_steps=100_000, lr_warmup_steps=0, report_to="none",
                num_validation_images=0, seed=seed, device="cpu", output_dir=out, overwrite=True)


def run(kind: str, optimizer: str, lr: float, seed: int, batch_size: int, steps: int, eval_every: int,
        with_clip: bool = False, judge: dict[str, int] | None = None) -> dict[str, Any]:
    """One DreamBooth (``kind="dreambooth"``) or ED-LoRA (``"edlora"``) run with the judge attached.

    ``judge``: smaller evaluation sets for quick checks (``DiffusionJudge`` keywords ``n_prior``,
    ``per_item``, ``prior_per_item``); the full grid uses the defaults.

    ``optimizer`` is a trainer optimizer name, or ``scaled_adamw_official``: scaled_adamw whose groups
    are switched to ``variant="official"`` before the first step (the trainers take no variant).
    """
    from difflora.config import parse_config
    from difflora.errors import UserError

    if kind == "dreambooth":
        from difflora.train.dreambooth import DreamBoothConfig as Config
        from difflora.train.dreambooth import train
        words, make = "sks", dreambooth_options
    else:
        from difflora.mix_of_show.edlora import EDLoRAConfig as Config
        from difflora.mix_of_show.edlora import train
        words, make = " ".join(w.strip() for w in EDLORA_WORDS.split("+")), edlora_options
    official = optimizer == "scaled_adamw_official"
    record: dict[str, Any] = {"steps": [], "eval_loss": [], "prior_drift": [], "prior_loss": []}
    state: dict[str, Any] = {}

    def callback(step: int, trainer: Any) -> None:
        if step == 0:
            state["judge"] = DiffusionJudge(trainer, RESOLUTION, words, **(judge or {}))
            if official:
                from difflora.optim import ScaledAdamW

                inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
                if not isinstance(inner, ScaledAdamW):
                    raise RuntimeError(f"expected the trainer's ScaledAdamW, got {type(inner).__name__}")
                for group in inner.param_groups:
                    group["variant"] = "official"
        if step % eval_every == 0 or step == steps:
            if record["steps"] and record["steps"][-1] == step:
                return
            values = state["judge"]()
            record["steps"].append(step)
            for key, value in values.items():
                record[key].append(value if math.isfinite(value) else None)
        if step == steps and with_clip:
            record.update(clip_scores(trainer, RESOLUTION, words))

    tmp = Path(tempfile.mkdtemp(prefix=f"claims-{kind}-"))
    try:
        cfg = parse_config(Config, _argv(make("scaled_adamw" if official else optimizer, lr, seed, batch_size,
                                               steps, tmp / "run")), prog="claims")
        t0 = time.perf_counter()
        diverged_at = None
        try:
            summary = train(cfg, callbacks=[callback])
            record["final_train_loss"] = summary.get("final_loss")
        except UserError as err:
            if "became" not in str(err):
                raise
            found = re.search(r"at step (\d+)", str(err))
            diverged_at = int(found.group(1)) if found else -1
            record["divergence"] = str(err).split(";")[0]
        record["seconds"] = round(time.perf_counter() - t0, 2)
        record["diverged_at"] = diverged_at
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record
