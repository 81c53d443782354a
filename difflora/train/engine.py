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
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
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

logger = logging.getLogger(__name__)

# Noise and timesteps of example k of stream s come from stream s + NOISE_STREAM, so they never
# share a generator with the VAE sample of any example (streams: 0 = instance, 1 = class).
NOISE_STREAM = 10
CACHE_STREAM = 20  # cached latents: generators keyed by image content, on streams of their own


# ------------------------------------------------------------------------------------------------
# Pure pieces of a step: small enough to test alone.
# ------------------------------------------------------------------------------------------------

def example_generator(seed: int, stream: int, k: int) -> torch.Generator:
    """The generator of the k-th example drawn from a stream."""
    return torch.Generator().manual_seed((seed * 7_919 + stream) * 1_000_000_007 + k)


def draw(images: ImageSet, k: int) -> Example:
    """The k-th example of the endless shuffled stream over ``images``."""
    epoch, pos = divmod(k, len(images))
    return images.example(images.order(epoch)[pos], epoch)


@torch.no_grad()
def encode_images(vae: nn.Module, pixels: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """VAE posterior sample per example (each with its own generator) times the scaling factor."""
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    eps = torch.stack([torch.randn(dist.mean.shape[1:], generator=g) for g in generators]).to(dist.mean)
    latents = dist.mean + dist.std * eps
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


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
    """Latents of drawn examples: encoded every time, or once per image when cached.

    A cached image's VAE sample is drawn from a generator keyed by (seed, stream, image content),
    not by the example number that first met the image: a resumed run starts with an empty cache
    and must draw the same sample the uninterrupted run drew epochs earlier.
    """

    def __init__(self, vae: nn.Module, seed: int, cache: bool):
        self.vae, self.seed, self.cache = vae, seed, cache
        self._cached: dict[tuple[int, bytes], torch.Tensor] = {}

    def __call__(self, examples: list[Example], stream: int, ks: list[int]) -> torch.Tensor:
        pixels = torch.stack([e.pixel_values for e in examples])
        if not self.cache:
            return encode_images(self.vae, pixels, [example_generator(self.seed, stream, k) for k in ks])
        out = []
        for px in pixels:
            digest = hashlib.sha256(px.detach().cpu().contiguous().numpy().tobytes()).digest()
            if (stream, digest) not in self._cached:
                gen = example_generator(self.seed, CACHE_STREAM + stream, int.from_bytes(digest[:4], "big"))
                self._cached[stream, digest] = encode_images(self.vae, px[None], [gen])[0]
            out.append(self._cached[stream, digest])
        return torch.stack(out)


# ------------------------------------------------------------------------------------------------
# What a job supplies
# ------------------------------------------------------------------------------------------------

@dataclass
class Stream:
    """A source of training examples and the weight of its loss (instances 1.0; prior classes)."""

    images: ImageSet
    weight: float = 1.0


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
        base = load_base_model(cfg.pretrained_model_name_or_path, cfg.revision, cfg.variant)
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
        self.latents = LatentSource(base.vae, cfg.seed, cfg.cache_latents)

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
            self.optimizer = build_optimizer(cfg.optimizer, groups, **options)
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

    def _resume(self) -> None:
        self.step, self.losses, self.last_good = 0, [], self.resume
        if self.resume is None:
            return
        identity = {"base_model": self.cfg.pretrained_model_name_or_path, "rank": self.cfg.rank,
                    "optimizer": self.cfg.optimizer, **self.job.identity()}
        state = ckpt.load_checkpoint(self.resume, self.trainable, self.optimizer, self.lr_scheduler, identity)
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
        return [draw(images, k) for k in ks], ks

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
        extra = base.family.unet_kwargs(cond, [e.original_size for e in examples],
                                        [e.crop_top_left for e in examples], (cfg.resolution, cfg.resolution),
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
        return sample_grid(pipe, self.job.validation_prompts(), list(range(self.cfg.num_validation_images)),
                           self.cfg.resolution, self.cfg.validation_inference_steps, self.cfg.validation_guidance,
                           self.out / "samples" / f"step-{step}.png")

    def save_checkpoint(self) -> None:
        if self.accelerator.is_main_process:
            weights = {n: p.detach() for n, p in self.trainable.items()}
            ckpt.save_checkpoint(self.out, self.step, weights, self.optimizer, self.lr_scheduler,
                                 {"base_model": self.cfg.pretrained_model_name_or_path, "rank": self.cfg.rank,
                                  "optimizer": self.cfg.optimizer, **self.job.identity(), "losses": self.losses,
                                  "job": self.job.state(), **scaler_state(self.accelerator)},
                                 self.cfg.checkpoints_total_limit)
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
        self._setup_optimizer(len(streams[0].images))
        self._resume()
        acc, accum = self.accelerator, cfg.gradient_accumulation_steps
        if acc.is_main_process and cfg.report_to != "none":
            from difflora.config import config_to_dict

            acc.init_trackers(job.name, config={k: v for k, v in config_to_dict(cfg).items()
                                                if isinstance(v, (int, float, str, bool))})
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
                step_loss = 0.0
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
                    step_loss += loss.detach().item() / accum
                # Checked on values every process shares (mean loss, synced gradients, weights), so all
                # processes stop at the same step; non-finite weights never reach a checkpoint or a file.
                mean_loss = acc.reduce(torch.tensor(step_loss, device=self.device), reduction="mean").item()
                if not math.isfinite(mean_loss):
                    raise self.diverged(f"the loss became {mean_loss}", self.step + 1)
                params = list(self.trainable.values())
                grad_norm = (float(acc.clip_grad_norm_(params, cfg.max_grad_norm)) if cfg.max_grad_norm
                             else gradient_norm(params))
                if not math.isfinite(grad_norm) and acc.scaler is None:  # fp16's scaler skips such steps
                    raise self.diverged(f"the gradient norm became {grad_norm}", self.step + 1)
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                bad = ckpt.nonfinite(self.trainable)
                if bad is not None:
                    raise self.diverged(f"weight '{bad}' became NaN or infinite", self.step)
                self.losses.append(mean_loss)
                lr = self.lr_scheduler.get_last_lr()[0]
                bar.update(1)
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", **job.after_step(self.step))
                if cfg.report_to != "none":
                    acc.log({"loss": mean_loss, "lr": lr, "grad_norm": grad_norm}, step=self.step)
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


def gradient_norm(params: list[nn.Parameter]) -> float:
    """Total 2-norm of the gradients, for the finiteness check when clipping is off."""
    norms = [torch.linalg.vector_norm(p.grad.detach()) for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
