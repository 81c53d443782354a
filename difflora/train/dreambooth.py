"""DreamBooth LoRA training for SD 1.x / 2.x / SDXL with the scaled optimizers.

Read ``train`` top to bottom: set-up (accelerator, model, LoRA, data, optimizer), then one loop
(batch -> latents -> noise -> UNet -> loss -> preconditioned step -> checkpoint -> samples), then
the outputs (LoRA files, samples, loss curve, scores, model card). The flags are those of
diffusers' ``train_dreambooth_lora.py`` so existing command lines run unchanged.

Determinism: every random draw in the loop (data order, crops, flips, VAE sampling, noise,
timesteps) comes from a generator seeded by ``(seed, example number)``. A run therefore does not
depend on how it is split across processes or interrupted, and resuming a checkpoint gives the
same weights, bit for bit on CPU, as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from difflora.config import config_to_dict, parse_config
from difflora.data import ImageSet, load_image_set
from difflora.errors import UserError
from difflora.lora_io import LORA_WEIGHT_NAME
from difflora.models import LORA_TARGET_PRESETS, BaseModel, add_lora, load_base_model
from difflora.optim import OPTIMIZER_NAMES, build_optimizer
from difflora.train import checkpoint as ckpt
from difflora.train.loss import diffusion_loss, target_for
from difflora.train.outputs import prepare_output_dir
from difflora.train.prior import ensure_class_images
from difflora.train.validation import pipeline_from, plot_loss, sample_grid, write_metrics, write_model_card

logger = logging.getLogger(__name__)


def _h(text: str, default=None, **kw):
    return field(default=default, metadata={"help": text}, **kw)


@dataclass
class DreamBoothConfig:
    """Train a DreamBooth LoRA (flags as in diffusers' train_dreambooth_lora.py, plus difflora's)."""

    # Model
    pretrained_model_name_or_path: str = field(metadata={"help": "base model: hub id or local diffusers folder"})
    revision: str | None = _h("model revision on the hub")
    variant: str | None = _h("weights variant, e.g. fp16")
    # Data
    instance_data_dir: str | None = _h("folder with the concept's images")
    instance_prompt: str | None = _h("prompt with the trigger word, e.g. 'a photo of sks dog'")
    captions: bool = _h("use name.txt beside each image as its prompt (falls back to instance_prompt)", False)
    class_data_dir: str | None = _h("folder of class images for prior preservation (generated if short)")
    class_prompt: str | None = _h("prompt of the class, e.g. 'a photo of dog'")
    with_prior_preservation: bool = _h("add the prior-preservation loss on class images", False)
    prior_loss_weight: float = _h("weight of the prior-preservation loss", 1.0)
    num_class_images: int = _h("class images wanted; missing ones are generated with the base model", 100)
    resolution: int = _h("training image size in pixels (multiple of 8)", 512)
    center_crop: bool = _h("center-crop instead of random crops", False)
    random_flip: bool = _h("flip images horizontally at random", False)
    cache_latents: bool = _h("encode every image once (center crops) and free the VAE from the loop", False)
    # LoRA
    rank: int = _h("LoRA rank r", 4)
    lora_alpha: float | None = _h("LoRA alpha (scale alpha/r); default: equal to rank", None)
    lora_targets: Literal["attention", "attention+ff", "all-linear"] = _h(
        "layers to adapt: attention (diffusers), attention+ff, all-linear (kohya-like, 1x1 convs too)", "attention")
    train_text_encoder: bool = _h("also train LoRA on the text encoder(s)", False)
    # Optimisation
    optimizer: str = _h(f"one of {', '.join(OPTIMIZER_NAMES)}", "scaled_adamw")
    optimizer_reg: float | None = _h("damping reg of the scaled optimizers' (B^T B + reg I)^-1; default: library's")
    learning_rate: float = _h("UNet LoRA learning rate", 1e-4)
    text_encoder_lr: float | None = _h("text-encoder LoRA learning rate; default: learning_rate")
    scale_lr: bool = _h("multiply learning rates by batch size x accumulation x processes", False)
    adam_beta1: float = _h("AdamW beta1", 0.9)
    adam_beta2: float = _h("AdamW beta2", 0.999)
    adam_weight_decay: float = _h("decoupled weight decay", 1e-2)
    adam_epsilon: float = _h("AdamW epsilon", 1e-8)
    sgd_momentum: float = _h("momentum of sgd / scaled_sgd", 0.0)
    use_8bit_adam: bool = _h("shorthand for --optimizer adamw8bit (needs bitsandbytes)", False)
    lr_scheduler: str = _h("diffusers schedule: constant, constant_with_warmup, linear, cosine, ...", "constant")
    lr_warmup_steps: int = _h("warm-up steps of the LR schedule", 0)
    lr_num_cycles: int = _h("cycles of cosine_with_restarts", 1)
    lr_power: float = _h("power of the polynomial schedule", 1.0)
    max_grad_norm: float = _h("gradient clipping norm (0 disables)", 1.0)
    snr_gamma: float | None = _h("Min-SNR weighting gamma (5.0 is the usual value); off by default")
    noise_offset: float = _h("noise offset (e.g. 0.05) for very dark / bright images", 0.0)
    # Schedule
    train_batch_size: int = _h("images per process per micro-step", 4)
    gradient_accumulation_steps: int = _h("micro-steps per optimizer step", 1)
    max_train_steps: int | None = _h("optimizer steps; overrides num_train_epochs")
    num_train_epochs: int = _h("epochs over the instance images when max_train_steps is not set", 1)
    gradient_checkpointing: bool = _h("trade compute for memory", False)
    mixed_precision: Literal["no", "fp16", "bf16"] | None = _h("frozen weights in fp16/bf16; LoRA stays fp32")
    allow_tf32: bool = _h("allow TF32 matmuls on Ampere+ GPUs", False)
    seed: int = _h("seed of every random draw", 0)
    # Checkpoints and outputs
    output_dir: str = _h("where the LoRA, samples and checkpoints go", "lora-dreambooth-model")
    overwrite: bool = _h("replace a finished run in output_dir (other files are kept)", False)
    checkpointing_steps: int = _h("save a resumable checkpoint every N steps", 500)
    checkpoints_total_limit: int | None = _h("keep at most this many checkpoints")
    resume_from_checkpoint: str | None = _h("'latest' or a checkpoint-N folder to continue from")
    output_kohya_format: bool = _h("also write a kohya-format file for A1111 / ComfyUI", False)
    # Validation and reporting
    validation_prompt: str | None = _h("prompt(s) for sample grids, separated by '|'; default: instance_prompt")
    num_validation_images: int = _h("seeds per validation prompt (0 turns sample grids off)", 4)
    validation_steps: int | None = _h("sample a grid every N steps (and always at the start and end)")
    validation_epochs: int | None = _h("as in diffusers: sample every N epochs (converted to steps)")
    validation_inference_steps: int = _h("sampler steps of validation grids", 25)
    validation_guidance: float = _h("classifier-free guidance of validation grids", 7.5)
    clip_model: str | None = _h("CLIP model (folder or hub id) for CLIP-T / CLIP-I scores in metrics.json")
    report_to: Literal["none", "tensorboard"] = _h("tensorboard writes logs under output_dir/logs", "none")
    logging_dir: str = _h("subfolder of output_dir for logs", "logs")
    dataloader_num_workers: int = _h("accepted for compatibility; images are held in memory", 0)

    def validate(self) -> None:
        if not self.instance_data_dir:
            raise UserError("missing --instance_data_dir; point it at the folder of your concept's images")
        if not self.instance_prompt:
            raise UserError("missing --instance_prompt; give a prompt with a trigger word, e.g. 'a photo of sks dog'")
        if self.rank <= 0:
            raise UserError(f"--rank must be a positive integer, got {self.rank}")
        if self.resolution <= 0 or self.resolution % 8:
            raise UserError(f"--resolution must be a positive multiple of 8, got {self.resolution}")
        for name in ("train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "checkpointing_steps"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name} must be positive, got {getattr(self, name)}")
        if self.max_train_steps is not None and self.max_train_steps <= 0:
            raise UserError(f"--max_train_steps must be positive, got {self.max_train_steps}")
        if self.learning_rate <= 0:
            raise UserError(f"--learning_rate must be positive, got {self.learning_rate}")
        if self.use_8bit_adam:
            self.optimizer = "adamw8bit"
        if self.optimizer not in OPTIMIZER_NAMES:
            raise UserError(f"unknown --optimizer '{self.optimizer}'; valid: {', '.join(OPTIMIZER_NAMES)}")
        from diffusers.optimization import SchedulerType

        schedules = [t.value for t in SchedulerType]
        if self.lr_scheduler not in schedules:
            raise UserError(f"unknown --lr_scheduler '{self.lr_scheduler}'; valid: {', '.join(schedules)}")
        if self.with_prior_preservation and not (self.class_data_dir and self.class_prompt):
            raise UserError("--with_prior_preservation needs --class_data_dir and --class_prompt")


# ------------------------------------------------------------------------------------------------
# Helpers of the loop: small and pure, so the loop itself reads in one sitting.
# ------------------------------------------------------------------------------------------------

def _example_generator(seed: int, stream: int, k: int) -> torch.Generator:
    """The generator of the k-th example drawn from a stream (0 = instance, 1 = class)."""
    return torch.Generator().manual_seed((seed * 7_919 + stream) * 1_000_000_007 + k)


def _draw(images: ImageSet, k: int):
    """The k-th example of the endless shuffled stream over ``images``."""
    epoch, pos = divmod(k, len(images))
    return images.example(images.order(epoch)[pos], epoch)


@torch.no_grad()
def _encode_images(vae, pixels: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """VAE posterior sample per example (each with its own generator) times the scaling factor."""
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    eps = torch.stack([torch.randn(dist.mean.shape[1:], generator=g) for g in generators]).to(dist.mean)
    latents = dist.mean + dist.std * eps
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def _encode_prompts(base: BaseModel, text_encoders: list, prompts: list[str], device) -> dict[str, torch.Tensor]:
    """Text conditioning: hidden states (SD) or concatenated penultimate states + pooled (SDXL)."""
    states, pooled = [], None
    for tokenizer, encoder in zip(base.tokenizers, text_encoders):
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        if base.is_sdxl:
            out = encoder(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = out[0]
        else:
            states.append(encoder(ids)[0])
    return {"encoder_hidden_states": torch.cat(states, dim=-1), "pooled": pooled}


def _lr_groups(cfg: DreamBoothConfig, unet, text_encoders: list, scale: float) -> list[dict]:
    groups = [{"params": [(f"unet.{n}", p) for n, p in unet.named_parameters() if p.requires_grad],
               "lr": cfg.learning_rate * scale}]
    if cfg.train_text_encoder:
        te = [(f"text_encoder_{i}.{n}", p) for i, enc in enumerate(text_encoders)
              for n, p in enc.named_parameters() if p.requires_grad]
        groups.append({"params": te, "lr": (cfg.text_encoder_lr or cfg.learning_rate) * scale})
    return groups


def _unwrap(accelerator, module):
    return accelerator.unwrap_model(module)


def train(cfg: DreamBoothConfig) -> dict:
    """Run one DreamBooth LoRA training job; return a summary (final loss, steps, output_dir)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType
    from diffusers.optimization import get_scheduler

    # ---- set-up: accelerator and output folder ------------------------------------------------
    out = Path(cfg.output_dir)
    # A checkpoint PATH may live outside output_dir (continue a run into a new folder).
    resume = ckpt.resolve_resume(out, cfg.resume_from_checkpoint)
    if resume is None and cfg.resume_from_checkpoint == "latest" and (out / LORA_WEIGHT_NAME).exists() \
            and not cfg.overwrite:
        raise UserError(f"output_dir '{out}' holds a finished run with no checkpoint to resume from; "
                        "pass --overwrite to train it again, or choose another folder")
    prepare_output_dir(out, cfg.overwrite, resuming=resume is not None)
    try:
        accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision or "no",
            log_with=None if cfg.report_to == "none" else cfg.report_to,
            project_dir=str(out / cfg.logging_dir),
        )
    except (ValueError, RuntimeError) as err:  # e.g. fp16 asked for on a machine without a GPU
        raise UserError(f"cannot set up training: {str(err).strip().splitlines()[0]}") from None
    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        raise UserError("DeepSpeed / FSDP shard LoRA factors, but the preconditioner needs whole factors; "
                        "launch with plain DDP (accelerate launch --multi_gpu) instead")
    if cfg.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    # ---- model and LoRA -------------------------------------------------------------------------
    base = load_base_model(cfg.pretrained_model_name_or_path, cfg.revision, cfg.variant)
    unet, vae, text_encoders = base.unet, base.vae, base.text_encoders
    for module in (unet, vae, *text_encoders):
        module.requires_grad_(False)
    torch.manual_seed(cfg.seed)  # LoRA A factors are initialised from the global generator
    alpha = cfg.lora_alpha if cfg.lora_alpha is not None else float(cfg.rank)
    targets = LORA_TARGET_PRESETS[cfg.lora_targets]
    add_lora(unet, cfg.rank, alpha, targets["unet"])
    if cfg.train_text_encoder:
        for enc in text_encoders:
            add_lora(enc, cfg.rank, alpha, targets["text_encoder"])
    # The VAE stays fp32 (it overflows in fp16; it is frozen and runs once per image).
    for module in (unet, vae, *text_encoders):
        module.to(device)
    if weight_dtype != torch.float32:
        for module in (unet, *text_encoders):
            module.to(dtype=weight_dtype)
    for module in (unet, *text_encoders):
        for p in module.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # LoRA weights stay fp32 under mixed precision
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            for enc in text_encoders:
                enc.gradient_checkpointing_enable()

    # ---- data -----------------------------------------------------------------------------------
    instances = load_image_set(cfg.instance_data_dir, cfg.instance_prompt, cfg.resolution,
                               center_crop=cfg.center_crop or cfg.cache_latents, random_flip=cfg.random_flip,
                               captions=cfg.captions, seed=cfg.seed)
    classes = None
    if cfg.with_prior_preservation:
        if accelerator.is_main_process:
            ensure_class_images(Path(cfg.class_data_dir), cfg.class_prompt, cfg.num_class_images,
                                lambda: pipeline_from(base, unet, text_encoders, base.noise_scheduler.config),
                                cfg.resolution, cfg.seed)
        accelerator.wait_for_everyone()
        classes = load_image_set(cfg.class_data_dir, cfg.class_prompt, cfg.resolution,
                                 center_crop=cfg.center_crop, random_flip=cfg.random_flip, seed=cfg.seed + 1,
                                 what="class")

    # ---- optimizer and schedule -----------------------------------------------------------------
    n_proc, accum, bs = accelerator.num_processes, cfg.gradient_accumulation_steps, cfg.train_batch_size
    global_batch = bs * n_proc
    steps_per_epoch = math.ceil(len(instances) / (global_batch * accum))
    max_steps = cfg.max_train_steps or cfg.num_train_epochs * steps_per_epoch
    validation_every = cfg.validation_steps or (cfg.validation_epochs * steps_per_epoch
                                                if cfg.validation_epochs else None)
    lr_scale = bs * accum * n_proc if cfg.scale_lr else 1
    groups = _lr_groups(cfg, unet, text_encoders, lr_scale)
    trainable = {n: p for g in groups for n, p in g["params"]}
    try:
        options = {"lr": cfg.learning_rate * lr_scale, "weight_decay": cfg.adam_weight_decay}
        if "sgd" in cfg.optimizer:
            options["momentum"] = cfg.sgd_momentum
        else:
            options.update(betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
        if cfg.optimizer.startswith("scaled_") or cfg.optimizer == "peft_riemannian":
            options["reg"] = cfg.optimizer_reg
        if cfg.optimizer == "peft_riemannian":  # peft's version walks one model, at one learning rate
            if cfg.train_text_encoder:
                raise UserError("optimizer 'peft_riemannian' handles one model; drop --train_text_encoder "
                                "or use scaled_adamw")
            groups = [{"params": groups[0]["params"]}]
            options["model"] = unet
        optimizer = build_optimizer(cfg.optimizer, groups, **options)
    except (ValueError, ImportError) as err:
        raise UserError(f"cannot build optimizer '{cfg.optimizer}': {err}") from None
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=max_steps, num_cycles=cfg.lr_num_cycles, power=cfg.lr_power)
    trained_encoders = text_encoders if cfg.train_text_encoder else []
    prepared = accelerator.prepare(unet, *trained_encoders, optimizer)
    unet, optimizer = prepared[0], prepared[-1]
    live_encoders = list(prepared[1:-1]) if cfg.train_text_encoder else text_encoders

    identity = {"base_model": cfg.pretrained_model_name_or_path, "rank": cfg.rank,
                "lora_targets": cfg.lora_targets, "train_text_encoder": cfg.train_text_encoder,
                "optimizer": cfg.optimizer}
    step, losses = 0, []
    if resume is not None:
        state = ckpt.load_checkpoint(resume, trainable, optimizer, lr_scheduler, identity)
        step, losses = state["step"], state.get("losses", [])
        if step >= max_steps:
            raise UserError(f"checkpoint '{resume.name}' is already at step {step} >= max_train_steps "
                            f"{max_steps}; raise --max_train_steps to train further")
        accelerator.print(f"resumed from {resume} at step {step}")

    # Prompts are few: encode them once when the text encoders are frozen.
    prompt_cache: dict[str, dict] = {}

    def conditioning(prompts: list[str]) -> dict[str, torch.Tensor]:
        if cfg.train_text_encoder:
            return _encode_prompts(base, live_encoders, prompts, device)
        missing = [p for p in dict.fromkeys(prompts) if p not in prompt_cache]
        if missing:
            with torch.no_grad():
                enc = _encode_prompts(base, live_encoders, missing, device)
            for i, p in enumerate(missing):
                prompt_cache[p] = {k: (v[i] if v is not None else None) for k, v in enc.items()}
        return {k: (torch.stack([prompt_cache[p][k] for p in prompts]) if prompt_cache[prompts[0]][k] is not None
                    else None) for k in ("encoder_hidden_states", "pooled")}

    latent_cache: dict[tuple[int, int, int], torch.Tensor] = {}

    def latents_of(examples, stream: int, ks: list[int]) -> torch.Tensor:
        gens = [_example_generator(cfg.seed, stream, k) for k in ks]
        pixels = torch.stack([e.pixel_values for e in examples])
        if not cfg.cache_latents:
            return _encode_images(vae, pixels, gens)
        # Cached: one posterior sample per (stream, image content) drawn once, reused every epoch.
        out_latents = []
        for px, g in zip(pixels, gens):
            key = (stream, hash(px.numpy().tobytes()), 0)
            if key not in latent_cache:
                latent_cache[key] = _encode_images(vae, px[None], [g])[0]
            out_latents.append(latent_cache[key])
        return torch.stack(out_latents)

    def micro_batch(stream: int, images: ImageSet, first_k: int):
        ks = [first_k + accelerator.process_index * bs + j for j in range(bs)]
        examples = [_draw(images, k) for k in ks]
        return examples, ks

    def forward_loss(examples, ks, stream: int) -> torch.Tensor:
        latents = latents_of(examples, stream, ks).to(device, weight_dtype)
        gens = [_example_generator(cfg.seed, stream + 10, k) for k in ks]
        noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in gens]).to(latents)
        if cfg.noise_offset:
            noise = noise + cfg.noise_offset * torch.stack(
                [torch.randn((latents.shape[1], 1, 1), generator=g) for g in gens]).to(latents)
        timesteps = torch.stack([torch.randint(0, base.noise_scheduler.config.num_train_timesteps, (), generator=g)
                                 for g in gens]).to(device)
        noisy = base.noise_scheduler.add_noise(latents, noise, timesteps)
        cond = conditioning([e.prompt for e in examples])
        kwargs = {}
        if base.is_sdxl:
            time_ids = torch.tensor([[*e.original_size, *e.crop_top_left, cfg.resolution, cfg.resolution]
                                     for e in examples], dtype=weight_dtype, device=device)
            kwargs["added_cond_kwargs"] = {"text_embeds": cond["pooled"].to(weight_dtype), "time_ids": time_ids}
        pred = unet(noisy, timesteps, cond["encoder_hidden_states"].to(weight_dtype), **kwargs).sample
        target = target_for(base.noise_scheduler, latents, noise, timesteps)
        return diffusion_loss(pred, target, timesteps, base.noise_scheduler, cfg.snr_gamma).mean()

    # ---- validation ------------------------------------------------------------------------------
    val_prompts = [p.strip() for p in (cfg.validation_prompt or cfg.instance_prompt).split("|") if p.strip()]
    val_seeds = list(range(cfg.num_validation_images))
    samples_dir = out / "samples"

    def validate(at_step: int):
        if not accelerator.is_main_process or cfg.num_validation_images <= 0:
            return None
        pipe = pipeline_from(base, _unwrap(accelerator, unet),
                             [_unwrap(accelerator, e) for e in live_encoders], base.noise_scheduler.config)
        return sample_grid(pipe, val_prompts, val_seeds, cfg.resolution, cfg.validation_inference_steps,
                           cfg.validation_guidance, samples_dir / f"step-{at_step}.png")

    if accelerator.is_main_process and cfg.report_to != "none":
        accelerator.init_trackers("dreambooth", config={k: v for k, v in config_to_dict(cfg).items()
                                                        if isinstance(v, (int, float, str, bool))})
    before = validate(step) if step == 0 else None

    # ---- the loop ----------------------------------------------------------------------------------
    unet.train()
    for enc in trained_encoders:
        enc.train()
    bar = tqdm(total=max_steps, initial=step, desc="dreambooth", unit="step",
               disable=not accelerator.is_local_main_process)
    last_checkpoint = ckpt.list_checkpoints(out)[-1].name if ckpt.list_checkpoints(out) else None
    t0 = time.perf_counter()
    try:
        while step < max_steps:
            step_loss = 0.0
            for micro in range(accum):
                first_k = (step * accum + micro) * global_batch
                sync = contextlib.ExitStack()
                if micro < accum - 1:
                    for m in (unet, *trained_encoders):
                        sync.enter_context(accelerator.no_sync(m))
                with sync:
                    examples, ks = micro_batch(0, instances, first_k)
                    loss = forward_loss(examples, ks, stream=0)
                    if classes is not None:
                        cls_examples, cls_ks = micro_batch(1, classes, first_k)
                        loss = loss + cfg.prior_loss_weight * forward_loss(cls_examples, cls_ks, stream=1)
                    if not torch.isfinite(loss):
                        raise UserError(f"the loss became {loss.item()} at step {step + 1}; the last good checkpoint "
                                        f"is {last_checkpoint or 'none'}; lower --learning_rate or use fp32")
                    accelerator.backward(loss / accum)
                step_loss += loss.detach().item() / accum
            if cfg.max_grad_norm:
                accelerator.clip_grad_norm_(list(trainable.values()), cfg.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            mean_loss = accelerator.reduce(torch.tensor(step_loss, device=device), reduction="mean").item()
            losses.append(mean_loss)
            lr = lr_scheduler.get_last_lr()[0]
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
            if cfg.report_to != "none":
                accelerator.log({"loss": mean_loss, "lr": lr}, step=step)
            if step % cfg.checkpointing_steps == 0 and step < max_steps and accelerator.is_main_process:
                weights = {n: p.detach() for n, p in trainable.items()}
                path = ckpt.save_checkpoint(out, step, weights, optimizer, lr_scheduler,
                                            {**identity, "losses": losses}, cfg.checkpoints_total_limit)
                last_checkpoint = path.name
            if validation_every and step % validation_every == 0 and step < max_steps:
                validate(step)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    accelerator.wait_for_everyone()

    # ---- outputs ------------------------------------------------------------------------------------
    summary = {"output_dir": str(out), "steps": step, "final_loss": losses[-1] if losses else None,
               "seconds": seconds, "is_main_process": accelerator.is_main_process}
    if accelerator.is_main_process:
        from difflora.lora_io import save_lora

        after = validate(step)
        plain_unet = _unwrap(accelerator, unet)
        encoders = [_unwrap(accelerator, e) for e in live_encoders] if cfg.train_text_encoder else []
        save_lora(out, plain_unet, encoders[0] if encoders else None, encoders[1] if len(encoders) > 1 else None,
                  kohya=cfg.output_kohya_format,
                  metadata={"base_model": cfg.pretrained_model_name_or_path, "instance_prompt": cfg.instance_prompt,
                            "optimizer": cfg.optimizer, "rank": cfg.rank, "alpha": alpha, "steps": step})
        if losses:
            plot_loss(losses, out / "loss.png")
        metrics = {"final_loss": summary["final_loss"], "steps": step, "seconds": seconds}
        if cfg.clip_model:
            from difflora.data import load_image
            from difflora.evaluation import score_images

            reference = [load_image(p) for p in instances.paths]
            prompts = [p for p in val_prompts for _ in val_seeds]
            for label, rows in (("before", before), ("after", after)):
                if rows is not None:
                    flat = [im for row in rows for im in row]
                    metrics[label] = score_images(flat, prompts, reference, cfg.clip_model, device=str(device))
        write_metrics(out / "metrics.json", metrics)
        card = config_to_dict(cfg) | {"max_train_steps": step}
        write_model_card(out, card, f"samples/step-{step}.png" if after is not None else None, summary["final_loss"])
        summary["metrics"] = metrics
    accelerator.end_training()
    return summary


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(DreamBoothConfig, argv, prog="difflora dreambooth")
    summary = train(cfg)
    if summary["is_main_process"]:
        print(f"done: {summary['steps']} steps, final loss {summary['final_loss']:.4f}, "
              f"wrote {summary['output_dir']}")
