"""The training engine: one loop for DreamBooth, ED-LoRA and any later job.

Read :meth:`Trainer.run` top to bottom: set-up (accelerator, model, the job's adapters, data,
optimizer and schedule), then one loop (draw -> latents -> noise -> UNet -> loss -> accumulate ->
clip -> preconditioned step -> finiteness check -> checkpoint -> samples), then the job's outputs.
A job (:class:`TrainingJob`) supplies only what differs: what is trainable and at which learning
rates, its conditioning, its loss mask, an after-step hook and its output file.

Determinism: every random draw (data order, crops, flips, VAE sampling, noise, timesteps) comes
from a generator seeded by ``(seed, stream, example number)``. A run therefore does not depend on
how it is split across processes or interrupted: resuming a checkpoint gives the same weights, bit
for bit on CPU, as an uninterrupted run.

EMA (``--use_ema``): diffusers' ``EMAModel`` over the trainable weights, updated once after every
optimizer step, checkpointed with them and resumed bit for bit. Sample grids use the EMA weights;
the job writes the raw weights as usual and the EMA weights, in the same file format, to
``output_dir/ema/`` (so ``pipe.load_lora_weights(output_dir + "/ema")`` loads them).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from difflora.data import Example, ImageSet
from difflora.errors import UserError
from difflora.families import Conditioning
from difflora.models import BaseModel, load_base_model
from difflora.optim import build_optimizer
from difflora.output_dir import Outputs, prepare_output_dir
from difflora.train import checkpoint as ckpt
from difflora.train.loss import diffusion_loss, target_for
from difflora.train.options import DataOptions

logger = logging.getLogger(__name__)

# Noise and timesteps of example k of stream s come from stream s + NOISE_STREAM, so they never
# share a generator with the VAE sample of any example (streams: 0 = instance, 1 = class).
NOISE_STREAM = 10
CACHE_STREAM = 20  # cached latents: generators keyed by image content, on streams of their own
#: Kept VAE posteriors (see LatentSource) stay under this many bytes of CPU memory; images met after
#: that are encoded every time. About 8000 SD1.5 images at 512 px, 2000 SDXL images at 1024 px.
KEEP_POSTERIOR_BYTES = 1 << 30
EMA_DIR = "ema"  # subfolder of output_dir with the EMA weights' files (same names as the raw ones)


# ------------------------------------------------------------------------------------------------
# Pure pieces of a step: small enough to test alone.
# ------------------------------------------------------------------------------------------------

def example_generator(seed: int, stream: int, k: int) -> torch.Generator:
    """The generator of the k-th example drawn from a stream."""
    return torch.Generator().manual_seed((seed * 7_919 + stream) * 1_000_000_007 + k)


def draw(images: ImageSet, k: int, batch: int = 1) -> Example:
    """The k-th example of the endless shuffled stream over ``images``, drawn ``batch`` at a time.

    With buckets, examples ``k`` with equal ``k // batch`` share a bucket: a process's slice of a
    micro-batch starts at a multiple of ``batch``, so it never mixes image sizes.
    """
    return images.draw(k, batch)


@torch.no_grad()
def encode_images(vae: nn.Module, pixels: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """VAE posterior sample per example (each with its own generator) times the scaling factor."""
    return sample_latents(vae, *posterior(vae, pixels), generators)


@torch.no_grad()
def posterior(vae: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of the VAE's latent distribution for a batch of images."""
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return dist.mean, dist.std


def sample_latents(vae: nn.Module, mean: torch.Tensor, std: torch.Tensor,
                   generators: list[torch.Generator]) -> torch.Tensor:
    """``mean + std * eps`` with each example's own ``eps``, shifted and scaled as the UNet expects."""
    eps = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in generators]).to(mean)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (mean + std * eps - shift) * vae.config.scaling_factor


def noise_and_timesteps(shape: torch.Size, generators: list[torch.Generator], num_timesteps: int,
                        noise_offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example noise (plus the per-channel offset of Guttenberg, 2023) and timesteps."""
    noise = torch.stack([torch.randn(shape[1:], generator=g) for g in generators])
    if noise_offset:
        noise = noise + noise_offset * torch.stack([torch.randn((shape[1], 1, 1), generator=g) for g in generators])
    timesteps = torch.stack([torch.randint(0, num_timesteps, (), generator=g) for g in generators])
    return noise, timesteps


def latent_mask(masks: list[torch.Tensor], size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """(B, 1, h, w) pixel masks averaged down to the latent grid (a cell half covered weighs 0.5)."""
    return F.interpolate(torch.stack(masks), size=tuple(size), mode="area")


class LatentSource:
    """Latents of drawn examples: each image's VAE posterior kept where that is safe, else encoded.

    ``reuse[stream]``: that stream's images always give the same pixels (no flips, crops with no
    freedom: :attr:`ImageSet.fixed_pixels`), so the VAE's posterior (mean, std) of each image is
    kept and only the sample is drawn per example, with the example's own generator as without
    reuse: the same draws without the VAE in the loop.

    ``cache`` (``--cache_latents``, which implies centre crops): one sample per image, drawn from a
    generator keyed by (seed, stream, image content), not by the example number that first met
    the image: a resumed run starts with nothing kept and must draw the same sample the
    uninterrupted run drew epochs earlier.

    Kept posteriors live in CPU memory, up to :data:`KEEP_POSTERIOR_BYTES`; images met after that
    are encoded every time. Either way each image is encoded alone and sampled on the CPU, so a
    latent never depends on which images shared its first batch or were kept first (a resumed
    run keeps bits).
    """

    def __init__(self, vae: nn.Module, seed: int, cache: bool, reuse: list[bool] | None = None):
        self.vae, self.seed, self.cache = vae, seed, cache
        self.reuse = list(reuse or [])
        self._posteriors: dict[tuple[int, tuple[int, ...], bytes], tuple[torch.Tensor, torch.Tensor]] = {}
        self._kept_bytes = 0

    def __call__(self, examples: list[Example], stream: int, ks: list[int]) -> torch.Tensor:
        pixels = torch.stack([e.pixel_values for e in examples])
        if not self.cache and not (stream < len(self.reuse) and self.reuse[stream]):
            return encode_images(self.vae, pixels, [example_generator(self.seed, stream, k) for k in ks])
        keys, means, stds = [], [], []
        for px in pixels:
            key = self._key(stream, px)
            mean, std = self._posterior(key, px)
            keys.append(key)
            means.append(mean)
            stds.append(std)
        if self.cache:
            gens = [example_generator(self.seed, CACHE_STREAM + stream, int.from_bytes(key[2][:4], "big"))
                    for key in keys]
        else:
            gens = [example_generator(self.seed, stream, k) for k in ks]
        return sample_latents(self.vae, torch.cat(means), torch.cat(stds), gens)

    @staticmethod
    def _key(stream: int, px: torch.Tensor) -> tuple[int, tuple[int, ...], bytes]:
        digest = hashlib.sha256(px.detach().cpu().contiguous().numpy().tobytes()).digest()
        return stream, tuple(px.shape), digest  # the shape too: buckets of equal area, same bytes

    def _posterior(self, key: tuple[int, tuple[int, ...], bytes], px: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The image's posterior (on the CPU), kept while the memory budget allows."""
        found = self._posteriors.get(key)
        if found is None:
            found = tuple(t.cpu() for t in posterior(self.vae, px[None]))
            size = sum(t.numel() * t.element_size() for t in found)
            if self._kept_bytes + size <= KEEP_POSTERIOR_BYTES:
                self._posteriors[key] = found
                self._kept_bytes += size
        return found


# ------------------------------------------------------------------------------------------------
# What a job supplies
# ------------------------------------------------------------------------------------------------

@dataclass
class Stream:
    """A source of training examples and the weight of its loss (instances 1.0; prior classes)."""

    images: ImageSet
    weight: float = 1.0


# Data options whose non-default values a resumed checkpoint must match (see ``Trainer.identity``).
DRAW_OPTIONS = ("dataset_name", "repeats", "bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps",
                "caption_extension", "caption_dropout_rate", "shuffle_caption", "keep_tokens")
DRAW_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(DataOptions) if f.name in DRAW_OPTIONS}


class TrainingJob:
    """The part of training that differs between jobs; :class:`Trainer` does everything else.

    Order of the hooks: ``outputs`` / ``inputs`` and ``load_data`` before the model (bad input fails
    fast), ``attach`` on the loaded model, ``param_groups``; per step ``conditioning``,
    ``loss_mask`` and ``after_step``; at the end ``save``.
    """

    name = "train"

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.base: BaseModel | None = None

    # ---- set-up
    def outputs(self) -> Outputs:
        """What the job writes at the top of output_dir (what ``--overwrite`` may replace)."""
        raise NotImplementedError

    def inputs(self) -> list[Any]:
        """Paths the job reads: output_dir may not contain or replace them."""
        return [self.cfg.pretrained_model_name_or_path, self.cfg.instance_data_dir, self.cfg.mask_dir]

    def load_data(self) -> list[Stream]:
        raise NotImplementedError

    def class_images(self, trainer: Trainer) -> Stream | None:
        """An extra stream that needs the loaded model (prior preservation's class images)."""
        return None

    def attach(self, base: BaseModel) -> None:
        """Add adapters / tokens to the loaded, frozen model."""
        raise NotImplementedError

    def param_groups(self, lr_scale: float) -> list[dict[str, Any]]:
        """Named trainable parameters and their learning rates: ``[{"params": [(name, p)], "lr": x}]``."""
        raise NotImplementedError

    def trained_text_encoders(self) -> list[nn.Module]:
        """Text encoders with trainable parameters (train mode, DDP, conditioning every step)."""
        return []

    def identity(self) -> dict[str, Any]:
        """Settings a checkpoint must match to be resumed by this run."""
        return {}

    # ---- per step
    def conditioning(self, prompts: list[str], text_encoders: list[nn.Module], device: Any) -> Conditioning:
        return self.base.family.encode_prompts(self.base.tokenizers, text_encoders, prompts, device)

    def loss_mask(self, examples: list[Example], size: torch.Size) -> torch.Tensor | None:
        """(B, 1, h, w) loss weights on the latent grid (a cell half covered weighs 0.5), or None."""
        if examples[0].mask is None:
            return None
        return latent_mask([e.mask for e in examples], size)

    def after_step(self, step: int) -> dict[str, str]:
        """Called after every optimizer step; returns extra progress-bar fields."""
        return {}

    def state(self) -> dict[str, Any]:
        """Plain-typed job state for checkpoints (e.g. when the embeddings froze)."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state` from a checkpoint."""

    # ---- outputs
    def validation_prompts(self) -> list[str]:
        raise NotImplementedError

    def validation_pipeline(self, unet: nn.Module, text_encoders: list[nn.Module]) -> Any:
        """A sampling pipeline over the modules being trained (so the current adapters are active)."""
        from difflora.train.validation import pipeline_from

        return pipeline_from(self.base, unet, text_encoders, self.base.noise_scheduler.config)

    def save(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        """Write the job's result files (main process only); may add to ``summary``."""
        raise NotImplementedError

    def save_weights(self, trainer: Trainer, folder: Path) -> list[Path]:
        """Write the adapter file(s) of the weights as they are now into ``folder``; :meth:`save` calls
        it for ``output_dir``, and the trainer for ``output_dir/ema`` with the EMA weights swapped in."""
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------------

Callback = Callable[[int, "Trainer"], None]


class Trainer:
    """Runs a :class:`TrainingJob` with the shared options of :mod:`difflora.train.options`.

    ``callbacks`` are called as ``fn(step, trainer)`` once before training (step 0 of a new run)
    and after every optimizer step: benchmarks evaluate held-out losses through them.
    """

    def __init__(self, job: TrainingJob, callbacks: list[Callback] | None = None):
        self.job, self.cfg = job, job.cfg
        self.callbacks = list(callbacks or [])
        self._prompt_cache: dict[str, Conditioning] = {}

    # ---- set-up ---------------------------------------------------------------------------------------
    def _setup_output(self) -> None:
        cfg = self.cfg
        refuse_sharded_launch()
        self.out = out = Path(cfg.output_dir)
        # A checkpoint PATH may live outside output_dir (continue a run into a new folder).
        resume = ckpt.resolve_resume(out, cfg.resume_from_checkpoint)
        marker = self.job.outputs().marker
        if resume is None and cfg.resume_from_checkpoint == "latest" and marker and (out / marker).exists() \
                and not cfg.overwrite:
            raise UserError(f"output_dir '{out}' holds a finished run with no checkpoint to resume from; "
                            "pass --overwrite to train it again, or choose another folder")
        prepare_output_dir(out, self.job.outputs(), overwrite=cfg.overwrite, resuming=resume is not None, lock=True,
                           inputs=(*self.job.inputs(), resume), checkpoints_total_limit=cfg.checkpoints_total_limit,
                           keep=resume)
        if resume is not None and cfg.resume_from_checkpoint == "latest":
            resume = ckpt.resolve_resume(out, "latest")  # a checkpoint restored by the orphan clean-up counts
        self.resume = resume

    def _setup_accelerator(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedType

        cfg = self.cfg
        reset_precision_if_changed(cfg.mixed_precision)
        try:
            self.accelerator = Accelerator(
                mixed_precision=cfg.mixed_precision,  # None: the launcher's choice (accelerate launch)
                log_with=None if cfg.report_to == "none" else cfg.report_to,
                project_dir=str(self.out / cfg.logging_dir),
                cpu=str(getattr(cfg, "device", None) or "") == "cpu",
            )
        except (ValueError, RuntimeError, ImportError) as err:  # e.g. fp16 unsupported, a plugin missing
            raise UserError(f"cannot set up training: {str(err).strip().splitlines()[0]}") from None
        if self.accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
            raise UserError(NO_SHARDING)
        if cfg.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        self.device = self.accelerator.device
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            self.accelerator.mixed_precision, torch.float32)

    def _setup_model(self) -> None:
        cfg, job = self.cfg, self.job
        use_cache_dir(getattr(cfg, "cache_dir", None))
        base = load_base_model(cfg.pretrained_model_name_or_path, cfg.revision, cfg.variant)
        replace_components(base, cfg)
        from difflora.console import quiet_again

        quiet_again()  # the libraries are imported now: keep them quiet unless --verbose
        if getattr(cfg, "enable_xformers_memory_efficient_attention", False):
            logger.info("--enable_xformers_memory_efficient_attention: not needed, PyTorch's scaled-dot-product "
                        "attention (memory-efficient / flash kernels) is already used")
        for module in (base.unet, base.vae, *base.text_encoders):
            module.requires_grad_(False)
        job.base = self.base = base
        torch.manual_seed(cfg.seed)  # LoRA A factors are initialised from the global generator
        job.attach(base)
        # The VAE stays fp32 (it overflows in fp16; it is frozen and runs once per image); frozen
        # UNet / text-encoder weights take the mixed-precision dtype, trainable ones stay fp32.
        for module in (base.unet, base.vae, *base.text_encoders):
            module.to(self.device)
        if self.weight_dtype != torch.float32:
            for module in (base.unet, *base.text_encoders):
                module.to(dtype=self.weight_dtype)
        for module in (base.unet, *base.text_encoders):
            for p in module.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        if cfg.gradient_checkpointing:
            base.unet.enable_gradient_checkpointing()
            for enc in job.trained_text_encoders():
                enc.gradient_checkpointing_enable()
        if getattr(cfg, "compile", False):  # after LoRA and dtypes; the module itself stays for DDP, saving, sampling
            compile_forward(base.unet)

    def _setup_optimizer(self, n_examples: int) -> None:
        from diffusers.optimization import get_scheduler

        cfg, acc = self.cfg, self.accelerator
        n_proc, accum, bs = acc.num_processes, cfg.gradient_accumulation_steps, cfg.train_batch_size
        self.global_batch = bs * n_proc
        steps_per_epoch = math.ceil(n_examples / (self.global_batch * accum))
        self.max_steps = cfg.max_train_steps or cfg.num_train_epochs * steps_per_epoch
        epochs = getattr(cfg, "validation_epochs", None)
        self.validation_every = cfg.validation_steps or (epochs * steps_per_epoch if epochs else None)
        lr_scale = bs * accum * n_proc if cfg.scale_lr else 1
        groups = self.job.param_groups(lr_scale)
        self.trainable = {n: p for g in groups for n, p in g["params"]}
        options: dict[str, Any] = {"lr": groups[0]["lr"], "weight_decay": cfg.adam_weight_decay}
        if "sgd" in cfg.optimizer:
            options["momentum"] = cfg.sgd_momentum
        else:
            options.update(betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
        if cfg.optimizer.startswith("scaled_") or cfg.optimizer == "peft_riemannian":
            options["reg"] = cfg.optimizer_reg
        if cfg.optimizer == "peft_riemannian":  # peft's version walks one model, at one learning rate
            if len(groups) > 1:
                raise UserError(f"optimizer 'peft_riemannian' handles one model at one learning rate and this "
                                f"{self.job.name} run trains {len(groups)} groups; use scaled_adamw"
                                + (" or drop --train_text_encoder" if self.job.trained_text_encoders() else ""))
            groups = [{"params": groups[0]["params"]}]
            options["model"] = self.base.unet
        try:
            self.optimizer = (build_prodigy(groups, cfg) if cfg.optimizer == "prodigy"
                              else build_optimizer(cfg.optimizer, groups, **options))
        except (ValueError, ImportError, TypeError) as err:
            raise UserError(f"cannot build optimizer '{cfg.optimizer}': {err}") from None
        self.lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=self.optimizer,
                                          num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=self.max_steps,
                                          num_cycles=cfg.lr_num_cycles, power=cfg.lr_power)
        trained = self.job.trained_text_encoders()
        prepared = acc.prepare(self.base.unet, *trained, self.optimizer)
        self.unet, self.optimizer = prepared[0], prepared[-1]
        self.trained_encoders = list(prepared[1:-1])
        self.text_encoders = self.trained_encoders or list(self.base.text_encoders)
        self.ema = None
        if cfg.use_ema:  # shadow copies of the fp32 trainable weights, on their device
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(list(self.trainable.values()), decay=cfg.ema_decay)

    def identity(self) -> dict[str, Any]:
        """Settings a checkpoint must match to be resumed by this run (EMA and DoRA only when on, so
        checkpoints written before those options existed still resume)."""
        extra: dict[str, Any] = {}
        if self.cfg.use_ema:
            extra.update(use_ema=True, ema_decay=self.cfg.ema_decay)
        if self.cfg.use_dora:
            extra["use_dora"] = True
        # Options that change which example is drawn at which step: a resume with other values would
        # silently continue a different run. Recorded only when not at their defaults, like EMA.
        for name, default in DRAW_DEFAULTS.items():
            if getattr(self.cfg, name, default) != default:
                extra[name] = getattr(self.cfg, name)
        return {"base_model": self.cfg.pretrained_model_name_or_path, "rank": self.cfg.rank,
                "optimizer": self.cfg.optimizer, **extra, **self.job.identity()}

    @contextlib.contextmanager
    def ema_weights(self) -> Any:
        """The EMA weights in the model for the duration (nothing happens without ``--use_ema``)."""
        if self.ema is None:
            yield
            return
        params = list(self.trainable.values())
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)

    def _resume(self) -> None:
        self.step, self.losses, self.last_good = 0, [], self.resume
        if self.resume is None:
            return
        # Draw options absent from a checkpoint were at their defaults when it was written.
        defaults = {name: (getattr(self.cfg, name, d), d) for name, d in DRAW_DEFAULTS.items()}
        state = ckpt.load_checkpoint(self.resume, self.trainable, self.optimizer, self.lr_scheduler, self.identity(),
                                     ema=self.ema, defaults=defaults)
        restore_scaler(self.accelerator, state, self.resume)
        self.job.load_state(state.get("job", {}))
        self.step, self.losses = state["step"], state.get("losses", [])
        if self.step >= self.max_steps:
            raise UserError(f"checkpoint '{self.resume.name}' is already at step {self.step} >= max_train_steps "
                            f"{self.max_steps}; raise --max_train_steps to train further")
        self.accelerator.print(f"resumed from {self.resume} at step {self.step}")

    # ---- one micro-batch ------------------------------------------------------------------------------
    def micro_batch(self, images: ImageSet, first_k: int) -> tuple[list[Example], list[int]]:
        """The examples this process draws: its slice of the global micro-batch starting at ``first_k``."""
        bs = self.cfg.train_batch_size
        ks = [first_k + self.accelerator.process_index * bs + j for j in range(bs)]
        return [draw(images, k, bs) for k in ks], ks

    def conditioning(self, prompts: list[str]) -> Conditioning:
        """The job's conditioning; with frozen text encoders each prompt is encoded once and reused."""
        if self.trained_encoders:
            return self.job.conditioning(prompts, self.text_encoders, self.device)
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            with torch.no_grad():
                enc = self.job.conditioning(missing, self.text_encoders, self.device)
            for i, p in enumerate(missing):
                self._prompt_cache[p] = enc.select([i])
        parts = [self._prompt_cache[p] for p in prompts]
        return Conditioning(torch.cat([c.hidden_states for c in parts]),
                            None if parts[0].pooled is None else torch.cat([c.pooled for c in parts]))

    def loss(self, examples: list[Example], ks: list[int], stream: int) -> torch.Tensor:
        """Diffusion loss of one micro-batch: latents -> noise -> UNet -> (masked, weighted) MSE."""
        cfg, base, dtype, device = self.cfg, self.base, self.weight_dtype, self.device
        latents = self.latents(examples, stream, ks).to(device, dtype)
        gens = [example_generator(cfg.seed, stream + NOISE_STREAM, k) for k in ks]
        noise, timesteps = noise_and_timesteps(latents.shape, gens, base.noise_scheduler.config.num_train_timesteps,
                                               cfg.noise_offset)
        noise, timesteps = noise.to(latents), timesteps.to(device)
        noisy = base.noise_scheduler.add_noise(latents, noise, timesteps)
        cond = self.conditioning([e.prompt for e in examples])
        crop = (getattr(cfg, "crops_coords_top_left_h", None), getattr(cfg, "crops_coords_top_left_w", None))
        extra = base.family.unet_kwargs(cond, [e.original_size for e in examples],
                                        [e.crop_top_left if crop == (None, None) else (crop[0] or 0, crop[1] or 0)
                                         for e in examples],
                                        examples[0].target_size,  # one bucket per micro-batch (see draw)
                                        dtype, device)
        pred = self.unet(noisy, timesteps, cond.hidden_states.to(dtype), **extra).sample
        target = target_for(base.noise_scheduler, latents, noise, timesteps)
        mask = self.job.loss_mask(examples, latents.shape[-2:])
        mask = None if mask is None else mask.to(device)
        return diffusion_loss(pred, target, timesteps, base.noise_scheduler, cfg.snr_gamma, mask=mask).mean()

    # ---- validation and checkpoints ---------------------------------------------------------------------
    def unwrapped(self) -> tuple[nn.Module, list[nn.Module]]:
        """The UNet and text encoders without DDP / compile wrappers."""
        unwrap = self.accelerator.unwrap_model
        return unwrap(self.unet), [unwrap(e) for e in self.text_encoders]

    def validate(self, step: int) -> list[list[Any]] | None:
        """A sample grid of the validation prompts at ``step`` (main process; None when off)."""
        if not self.accelerator.is_main_process or self.cfg.num_validation_images <= 0:
            return None
        from difflora.train.validation import sample_grid

        unet, encoders = self.unwrapped()
        pipe = self.job.validation_pipeline(unet, encoders)
        path = self.out / "samples" / f"step-{step}.png"
        with self.ema_weights():
            rows = sample_grid(pipe, self.job.validation_prompts(), list(range(self.cfg.num_validation_images)),
                               self.cfg.resolution, self.cfg.validation_inference_steps,
                               self.cfg.validation_guidance, path)
        if self.cfg.report_to != "none" and path.is_file():
            from difflora.tracking import log_image

            log_image(self.accelerator, "validation", path, step)
        return rows

    def save_checkpoint(self) -> None:
        if self.accelerator.is_main_process:
            weights = {n: p.detach() for n, p in self.trainable.items()}
            ckpt.save_checkpoint(self.out, self.step, weights, self.optimizer, self.lr_scheduler,
                                 {**self.identity(), "losses": self.losses, "job": self.job.state(),
                                  **scaler_state(self.accelerator)},
                                 self.cfg.checkpoints_total_limit, ema=self.ema)
        self.last_good = self.out / f"checkpoint-{self.step}"

    def diverged(self, what: str, at_step: int) -> UserError:
        return UserError(f"{what} at step {at_step}; the last good checkpoint is "
                         f"{ckpt.describe(self.last_good, self.out)}; lower the learning rate or use fp32")

    # ---- the run --------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Set up, train, write outputs; return a summary (final loss, steps, seconds, output_dir)."""
        cfg, job = self.cfg, self.job
        self._setup_output()
        streams = job.load_data()  # before the model: a bad folder or caption fails fast
        self._setup_accelerator()
        self._setup_model()
        extra = job.class_images(self)
        if extra is not None:
            streams.append(extra)
        self.latents = LatentSource(self.base.vae, cfg.seed, cfg.cache_latents,
                                    reuse=[s.images.fixed_pixels for s in streams])
        self._setup_optimizer(streams[0].images.epoch_length(cfg.train_batch_size))
        self._resume()
        acc, accum = self.accelerator, cfg.gradient_accumulation_steps
        if acc.is_main_process:
            from difflora.console import run_summary

            logger.info(run_summary(self, streams))
        if acc.is_main_process and cfg.report_to != "none":
            from difflora.tracking import tracked_config

            acc.init_trackers(job.name, config=tracked_config(cfg))
        self.before = self.validate(self.step) if self.step == 0 else None
        if self.step == 0:
            for fn in self.callbacks:
                fn(0, self)

        self.unet.train()
        for enc in self.trained_encoders:
            enc.train()
        bar = tqdm(total=self.max_steps, initial=self.step, desc=job.name, unit="step",
                   disable=not acc.is_local_main_process)
        t0 = time.perf_counter()
        try:
            while self.step < self.max_steps:
                step_loss = torch.zeros((), device=self.device)
                for micro in range(accum):
                    first_k = (self.step * accum + micro) * self.global_batch
                    sync = contextlib.ExitStack()
                    if micro < accum - 1:  # DDP: all-reduce gradients on the last micro-step only
                        for m in (self.unet, *self.trained_encoders):
                            sync.enter_context(acc.no_sync(m))
                    with sync:
                        loss = 0.0
                        for stream, source in enumerate(streams):
                            examples, ks = self.micro_batch(source.images, first_k)
                            loss = loss + source.weight * self.loss(examples, ks, stream)
                        acc.backward(loss / accum)
                    step_loss += loss.detach().float() / accum
                # Checked on values every process shares (mean loss, synced gradients, weights), so all
                # processes stop at the same step; non-finite weights never reach a checkpoint or a file.
                # Loss and gradient norm reach the host together: one synchronisation, before the update.
                params = list(self.trainable.values())
                loss_t = acc.reduce(step_loss, reduction="mean")
                norm_t = acc.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm else gradient_norm(params)
                mean_loss, grad_norm = torch.stack([loss_t, torch.as_tensor(norm_t).to(loss_t)]).tolist()
                if not math.isfinite(mean_loss):
                    raise self.diverged(f"the loss became {mean_loss}", self.step + 1)
                if not math.isfinite(grad_norm) and acc.scaler is None:  # fp16's scaler skips such steps
                    raise self.diverged(f"the gradient norm became {grad_norm}", self.step + 1)
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                bad = None if sums_finite(params) else ckpt.nonfinite(self.trainable)  # exact check names it
                if bad is not None:
                    raise self.diverged(f"weight '{bad}' became NaN or infinite", self.step)
                if self.ema is not None:
                    self.ema.step(params)
                self.losses.append(mean_loss)
                lr = self.lr_scheduler.get_last_lr()[0]
                # Drawn when update's rate limit allows, not forced every step.
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", **job.after_step(self.step), refresh=False)
                bar.update(1)
                if cfg.report_to != "none":
                    conds = {}
                    every = cfg.preconditioner_log_steps
                    if every and (self.step == 1 or self.step % every == 0):
                        from difflora.optim.diagnostics import gram_condition_numbers

                        # what the preconditioner sees: cond(B^T B), cond(A A^T), median / max over pairs
                        with contextlib.suppress(ValueError):  # a factor without its partner: no pairs
                            conds = gram_condition_numbers(self.trainable.items())
                    acc.log({"loss": mean_loss, "lr": lr, "grad_norm": grad_norm,
                             **{f"preconditioner/{k}": v for k, v in conds.items()}}, step=self.step)
                for fn in self.callbacks:
                    fn(self.step, self)
                if self.step % cfg.checkpointing_steps == 0 and self.step < self.max_steps:
                    self.save_checkpoint()
                if self.validation_every and self.step % self.validation_every == 0 and self.step < self.max_steps:
                    self.validate(self.step)
        finally:
            bar.close()
        seconds = time.perf_counter() - t0
        acc.wait_for_everyone()

        summary: dict[str, Any] = {"output_dir": str(self.out), "steps": self.step,
                                   "final_loss": self.losses[-1] if self.losses else None, "seconds": seconds,
                                   "is_main_process": acc.is_main_process}
        if acc.is_main_process:
            from difflora.train.validation import plot_loss

            self.after = self.validate(self.step)
            job.save(self, summary)
            if self.ema is not None:
                with self.ema_weights():
                    summary["ema_files"] = [str(p) for p in job.save_weights(self, self.out / EMA_DIR)]
            if self.losses:
                plot_loss(self.losses, self.out / "loss.png")
        acc.end_training()
        return summary


# ------------------------------------------------------------------------------------------------
# Launch environment and mixed precision
# ------------------------------------------------------------------------------------------------

NO_SHARDING = ("DeepSpeed / FSDP shard LoRA factors, but the preconditioner needs whole factors; "
               "launch with plain DDP (accelerate launch --multi_gpu) instead")


def refuse_sharded_launch() -> None:
    """Refuse a DeepSpeed / FSDP launch from its environment, before anything is imported or written.

    Read before the Accelerator is built, so an environment asking for DeepSpeed without it installed
    gets the same one line as one with it installed, not accelerate's ImportError.
    """
    from accelerate.utils import parse_flag_from_env

    if parse_flag_from_env("ACCELERATE_USE_DEEPSPEED") or parse_flag_from_env("ACCELERATE_USE_FSDP"):
        raise UserError(NO_SHARDING)


def reset_precision_if_changed(mixed_precision: str | None) -> None:
    """Let a job run again in the same process with another precision (sweeps, notebooks, tests).

    accelerate keeps one precision per process and refuses to change it; only that part is reset,
    the device and process group are kept. ``None`` means the launcher's choice, as in accelerate.
    """
    from accelerate.state import AcceleratorState
    from accelerate.utils import parse_choice_from_env

    wanted = (mixed_precision or parse_choice_from_env("ACCELERATE_MIXED_PRECISION", "no")).lower()
    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != wanted:
        AcceleratorState._reset_state()


def scaler_state(accelerator: Any) -> dict[str, Any]:
    """fp16's loss-scale state (GPUs only), saved in a checkpoint so that a resumed run starts from the
    scale the uninterrupted run had reached, not from the initial one."""
    scaler = accelerator.scaler
    return {"grad_scaler": scaler.state_dict()} if scaler is not None and scaler.is_enabled() else {}


def restore_scaler(accelerator: Any, state: dict[str, Any], path: Path) -> None:
    saved = state.get("grad_scaler")
    if accelerator.scaler is None or saved is None:
        return
    try:
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in saved.values()):
            raise TypeError
        accelerator.scaler.load_state_dict(saved)
    except (AttributeError, KeyError, RuntimeError, TypeError):
        raise UserError(f"cannot resume from checkpoint '{path}': state.json 'grad_scaler' is not a loss-scale "
                        "state; resume from another checkpoint-N, or train from the start in a new output_dir"
                        ) from None


def use_cache_dir(cache_dir: str | None) -> None:
    """``--cache_dir``: hub downloads of this run go there (the hub library reads it at download time)."""
    if not cache_dir:
        return
    import os

    import huggingface_hub.constants as hub

    os.environ["HF_HUB_CACHE"] = hub.HF_HUB_CACHE = str(Path(cache_dir).expanduser())


def replace_components(base: BaseModel, cfg: Any) -> None:
    """``--pretrained_vae_model_name_or_path`` / ``--tokenizer_name``: swap the model's VAE / first tokenizer,
    as diffusers' scripts do (a VAE folder or hub id holds the VAE at its top, not under ``vae/``)."""
    for what, path in (("VAE", getattr(cfg, "pretrained_vae_model_name_or_path", None)),
                       ("tokenizer", getattr(cfg, "tokenizer_name", None))):
        if not path:
            continue
        try:
            if what == "VAE":
                from diffusers import AutoencoderKL

                base.vae = AutoencoderKL.from_pretrained(path, revision=cfg.revision).requires_grad_(False)
            else:
                from transformers import AutoTokenizer

                base.tokenizers[0] = AutoTokenizer.from_pretrained(path, revision=cfg.revision)
        except (OSError, ValueError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UserError(f"cannot load the {what} '{path}': {first}") from None


def build_prodigy(groups: list[dict[str, Any]], cfg: Any) -> torch.optim.Optimizer:
    """``--optimizer prodigy`` (prodigyopt, optional) with diffusers' options; names dropped from the groups."""
    try:
        from prodigyopt import Prodigy
    except ImportError:
        raise UserError("--optimizer prodigy needs the prodigyopt package: pip install prodigyopt") from None
    plain = [{**{k: v for k, v in g.items() if k != "params"}, "params": [p for _, p in g["params"]]}
             for g in groups]
    return Prodigy(plain, lr=groups[0]["lr"], betas=(cfg.adam_beta1, cfg.adam_beta2), beta3=cfg.prodigy_beta3,
                   weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon, decouple=cfg.prodigy_decouple,
                   use_bias_correction=cfg.prodigy_use_bias_correction,
                   safeguard_warmup=cfg.prodigy_safeguard_warmup)


def gradient_norm(params: list[nn.Parameter]) -> torch.Tensor:
    """Total 2-norm of the gradients, for the finiteness check when clipping is off (a tensor: the
    caller reads it together with the loss)."""
    norms = [torch.linalg.vector_norm(p.grad.detach()) for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


def sums_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every tensor is finite, by one sum per tensor and one synchronisation (a third of the
    kernels of an isfinite-and-all per tensor). A tensor holding a NaN or an infinity never sums to
    a finite number; finite values may overflow the sum, so False only means "check exactly"."""
    return not tensors or bool(torch.stack([t.detach().sum().float() for t in tensors]).isfinite().all())


def compile_forward(module: nn.Module) -> None:
    """Replace ``module.forward`` by ``torch.compile`` of it (default mode, ``dynamic=False``).

    The module object stays (an ``OptimizedModule`` wrapper would change the parameter names that
    checkpoints and LoRA files are keyed by). Compiling happens at the first call; where it fails
    (no C compiler, an unsupported backend) the run continues eagerly after a one-line warning.
    """
    eager = module.forward
    compiled = torch.compile(eager, dynamic=False)

    def first_call(*args: Any, **kwargs: Any) -> Any:
        try:
            out = compiled(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - any compiler failure: eager gives the same result or error
            logger.warning("--compile: torch.compile failed (%s); training eagerly",
                           str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
            module.forward = eager
            return eager(*args, **kwargs)
        module.forward = compiled
        return out

    module.forward = first_call
