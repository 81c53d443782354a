"""Option groups shared by every training job (model, data, LoRA, optimizer, schedule,
checkpoints, validation, tracking).

A job's config is these groups plus its own fields (``class DreamBoothConfig(TrainingOptions)``);
the flat names are diffusers' flags, so command lines written for ``train_dreambooth_lora.py``
run unchanged. ``--help`` lists the options under these group names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from difflora.config import check_bounds
from difflora.errors import UserError
from difflora.optim import OPTIMIZER_NAMES


def option(text: str, default: Any = None, **kw: Any) -> Any:
    """A config field with its ``--help`` text."""
    return field(default=default, metadata={"help": text}, **kw)


@dataclass(kw_only=True)
class ModelOptions:
    pretrained_model_name_or_path: str = field(metadata={"help": "base model: hub id or local diffusers folder"})
    revision: str | None = option("model revision on the hub")
    variant: str | None = option("weights variant, e.g. fp16")


@dataclass(kw_only=True)
class DataOptions:
    instance_data_dir: str | None = option("folder with the concept's images")
    resolution: int = option("training image size in pixels (multiple of 8)", 512)
    center_crop: bool = option("center-crop instead of random crops", False)
    random_flip: bool = option("flip images horizontally at random", False)
    mask_dir: str | None = option("folder of name.png subject masks (white = subject) that weight the loss")
    cache_latents: bool = option("encode every image once (center crops) and free the VAE from the loop", False)


@dataclass(kw_only=True)
class LoRAOptions:
    rank: int = option("LoRA rank r", 4)
    lora_alpha: float | None = option("LoRA alpha (scale alpha/r); default: equal to rank", None)


@dataclass(kw_only=True)
class OptimizerOptions:
    optimizer: str = option(f"one of {', '.join(OPTIMIZER_NAMES)}", "scaled_adamw")
    optimizer_reg: float | None = option("damping reg of the scaled optimizers' (B^T B + reg I)^-1; "
                                         "default: library's")
    scale_lr: bool = option("multiply learning rates by batch size x accumulation x processes", False)
    adam_beta1: float = option("AdamW beta1", 0.9)
    adam_beta2: float = option("AdamW beta2", 0.999)
    adam_weight_decay: float = option("decoupled weight decay", 1e-2)
    adam_epsilon: float = option("AdamW epsilon", 1e-8)
    sgd_momentum: float = option("momentum of sgd / scaled_sgd", 0.0)
    lr_scheduler: str = option("diffusers schedule: constant, constant_with_warmup, linear, cosine, ...",
                               "constant")
    lr_warmup_steps: int = option("warm-up steps of the LR schedule", 0)
    lr_num_cycles: int = option("cycles of cosine_with_restarts", 1)
    lr_power: float = option("power of the polynomial schedule", 1.0)
    max_grad_norm: float = option("gradient clipping norm (0 disables)", 1.0)
    snr_gamma: float | None = option("Min-SNR weighting gamma (5.0 is the usual value); off by default")
    noise_offset: float = option("noise offset (e.g. 0.05) for very dark / bright images", 0.0)


@dataclass(kw_only=True)
class ScheduleOptions:
    train_batch_size: int = option("images per process per micro-step", 4)
    gradient_accumulation_steps: int = option("micro-steps per optimizer step", 1)
    max_train_steps: int | None = option("optimizer steps; overrides num_train_epochs")
    num_train_epochs: int = option("epochs over the instance images when max_train_steps is not set", 1)
    gradient_checkpointing: bool = option("trade compute for memory", False)
    mixed_precision: Literal["no", "fp16", "bf16"] | None = option(
        "frozen weights in fp16/bf16 (LoRA trains and saves in fp32); default: accelerate launch's setting, else no")
    allow_tf32: bool = option("allow TF32 matmuls on Ampere+ GPUs", False)
    seed: int = option("seed of every random draw", 0)


@dataclass(kw_only=True)
class CheckpointOptions:
    output_dir: str = option("where the result, samples and checkpoints go", "lora-dreambooth-model")
    overwrite: bool = option("replace a finished run in output_dir (other files are kept)", False)
    checkpointing_steps: int = option("save a resumable checkpoint every N steps", 500)
    checkpoints_total_limit: int | None = option("keep at most this many checkpoints")
    resume_from_checkpoint: str | None = option("'latest' or a checkpoint-N folder to continue from")


@dataclass(kw_only=True)
class ValidationOptions:
    validation_prompt: str | None = option("prompt(s) for sample grids, separated by '|'; default: instance_prompt")
    num_validation_images: int = option("seeds per validation prompt (0 turns sample grids off)", 4)
    validation_steps: int | None = option("sample a grid every N steps (and always at the start and end)")
    validation_inference_steps: int = option("sampler steps of validation grids", 25)
    validation_guidance: float = option("classifier-free guidance of validation grids", 7.5)


@dataclass(kw_only=True)
class TrackingOptions:
    report_to: Literal["none", "tensorboard"] = option("tensorboard writes logs under output_dir/logs", "none")
    logging_dir: str = option("subfolder of output_dir for logs", "logs")


@dataclass(kw_only=True)
class TrainingOptions(TrackingOptions, ValidationOptions, CheckpointOptions, ScheduleOptions, OptimizerOptions,
                      LoRAOptions, DataOptions, ModelOptions):
    """Every shared group; a job's config subclasses this and adds its own fields.

    Bases are listed last group first: dataclass fields follow the reversed method resolution
    order, so ``--help`` and saved configs read model, data, LoRA, optimizer, ... in that order.
    """

    def validate_shared(self) -> None:
        """Checks of the shared options; a job's ``validate`` calls this first."""
        if not self.instance_data_dir:
            raise UserError("missing --instance_data_dir; point it at the folder of your concept's images")
        if self.resolution <= 0 or self.resolution % 8:
            raise UserError(f"--resolution must be a positive multiple of 8, got {self.resolution}")
        # NaN passes every < / > test: without this a config built in code could train to NaN weights.
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise UserError(f"--max_grad_norm must be a finite number >= 0 (0 turns clipping off), "
                            f"got {self.max_grad_norm}")
        if self.optimizer not in OPTIMIZER_NAMES:
            raise UserError(f"unknown --optimizer '{self.optimizer}'; valid: {', '.join(OPTIMIZER_NAMES)}")
        from diffusers.optimization import SchedulerType

        schedules = [t.value for t in SchedulerType]
        if self.lr_scheduler not in schedules:
            raise UserError(f"unknown --lr_scheduler '{self.lr_scheduler}'; valid: {', '.join(schedules)}")
        check_bounds(self)
