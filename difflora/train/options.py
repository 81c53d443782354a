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

# The optimizer names, written out so that reading the options (``--help``) imports no torch;
# tests/train/test_diffusers_cli.py checks them against difflora.optim.OPTIMIZER_NAMES.
OPTIMIZER_CHOICES: tuple[str, ...] = (
    "adamw", "scaled_adamw", "sgd", "scaled_sgd", "loraplus", "peft_riemannian", "adamw8bit", "prodigy")
# accelerate's tracker names (diffusers passes --report_to to it unchanged).
REPORT_TO_CHOICES: tuple[str, ...] = (
    "none", "tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio", "all")


def option(text: str, default: Any = None, **kw: Any) -> Any:
    """A config field with its ``--help`` text."""
    return field(default=default, metadata={"help": text}, **kw)


@dataclass(kw_only=True)
class ModelOptions:
    pretrained_model_name_or_path: str = field(metadata={"help": "base model: hub id or local diffusers folder"})
    revision: str | None = option("model revision on the hub")
    variant: str | None = option("weights variant, e.g. fp16")
    pretrained_vae_model_name_or_path: str | None = option(
        "a VAE folder or hub id to use instead of the model's own (e.g. SDXL's fp16-safe VAE)")
    tokenizer_name: str | None = option("a tokenizer folder or hub id to use instead of the model's (first) one")
    cache_dir: str | None = option("where hub downloads are cached (default: the hub's own cache)")


@dataclass(kw_only=True)
class DataOptions:
    instance_data_dir: str | None = option("folder with the concept's images; sub-folders named 'N_words' "
                                           "(kohya) add their images N times per epoch, captioned 'words'")
    dataset_name: str | None = option("instead of instance_data_dir: a datasets-library dataset (hub id, or a "
                                      "local folder of images + metadata.jsonl); its train split is used")
    dataset_config_name: str | None = option("the dataset's configuration name, if it has several")
    image_column: str = option("the dataset column holding the images", "image")
    caption_column: str | None = option("the dataset column holding the captions; default: every image gets "
                                        "the instance prompt")
    repeats: int = option("list every instance image this many times per epoch", 1)
    resolution: int = option("training image size in pixels (multiple of 8)", 512)
    center_crop: bool = option("center-crop instead of random crops", False)
    random_flip: bool = option("flip images horizontally at random", False)
    bucket: bool = option("aspect-ratio buckets (kohya's --enable_bucket): crop each image to the bucket nearest "
                          "its aspect ratio (area <= resolution^2) instead of a square; batches never mix buckets",
                          False)
    min_bucket_reso: int = option("smallest bucket side in pixels", 256)
    max_bucket_reso: int = option("largest bucket side in pixels", 1024)
    bucket_reso_steps: int = option("bucket sides are multiples of this (a multiple of 8)", 64)
    caption_extension: str | None = option("extension of caption files beside the images (e.g. .caption); "
                                           "setting it reads captions; default: .txt")
    caption_dropout_rate: float = option("probability that a drawn example's caption is replaced by '' "
                                         "(trains the unconditional prediction)", 0.0)
    shuffle_caption: bool = option("shuffle the comma-separated tags of each caption per draw", False)
    keep_tokens: int = option("with shuffle_caption: keep the first N tags in place", 0)
    mask_dir: str | None = option("folder of name.png subject masks (white = subject) that weight the loss")
    cache_latents: bool = option("encode every image once (center crops) and free the VAE from the loop", False)

    def validate_data(self) -> None:
        """Checks of the data options: one image source, sane buckets, rates and counts."""
        if bool(self.instance_data_dir) == bool(self.dataset_name):
            if self.dataset_name:
                raise UserError("give only one of --instance_data_dir and --dataset_name")
            raise UserError("missing --instance_data_dir; point it at the folder of your concept's images "
                            "(or give --dataset_name)")
        if self.repeats < 1:
            raise UserError(f"--repeats must be >= 1, got {self.repeats}")
        if not 0 <= self.caption_dropout_rate <= 1:
            raise UserError(f"--caption_dropout_rate must be between 0 and 1, got {self.caption_dropout_rate}")
        if self.keep_tokens < 0:
            raise UserError(f"--keep_tokens must be >= 0, got {self.keep_tokens}")
        if self.bucket:
            from difflora.data.buckets import check_bucket_options

            check_bucket_options(self.resolution, self.min_bucket_reso, self.max_bucket_reso, self.bucket_reso_steps)


@dataclass(kw_only=True)
class LoRAOptions:
    rank: int = option("LoRA rank r", 4)
    lora_alpha: float | None = option("LoRA alpha (scale alpha/r); default: equal to rank", None)
    use_dora: bool = option("DoRA: also train a magnitude per output (peft's use_dora); the magnitude gets "
                            "the plain optimizer rule, A and B the preconditioned one", False)


@dataclass(kw_only=True)
class OptimizerOptions:
    optimizer: str = option(f"one of {', '.join(OPTIMIZER_CHOICES)} (diffusers' AdamW = adamw; prodigy "
                            "needs prodigyopt)", "scaled_adamw")
    optimizer_reg: float | None = option("damping reg of the scaled optimizers' (B^T B + reg I)^-1; "
                                         "default: library's")
    scale_lr: bool = option("multiply learning rates by batch size x accumulation x processes", False)
    adam_beta1: float = option("AdamW beta1", 0.9)
    adam_beta2: float = option("AdamW beta2", 0.999)
    adam_weight_decay: float = option("decoupled weight decay", 1e-2)
    adam_epsilon: float = option("AdamW epsilon", 1e-8)
    adam_weight_decay_text_encoder: float | None = option(
        "weight decay of the text-encoder parameters; default: adam_weight_decay")
    prodigy_beta3: float | None = option("prodigy: coefficient of its step-size estimate (default: sqrt(beta2))")
    prodigy_decouple: bool = option("prodigy: AdamW-style decoupled weight decay", True)
    prodigy_use_bias_correction: bool = option("prodigy: Adam's bias correction", True)
    prodigy_safeguard_warmup: bool = option("prodigy: remove the learning rate from the denominator during warm-up",
                                            True)
    sgd_momentum: float = option("momentum of sgd / scaled_sgd", 0.0)
    lr_scheduler: str = option("diffusers schedule: constant, constant_with_warmup, linear, cosine, ...",
                               "constant")
    lr_warmup_steps: int = option("warm-up steps of the LR schedule", 0)
    lr_num_cycles: int = option("cycles of cosine_with_restarts", 1)
    lr_power: float = option("power of the polynomial schedule", 1.0)
    max_grad_norm: float = option("gradient clipping norm (0 disables)", 1.0)
    snr_gamma: float | None = option("Min-SNR weighting gamma (5.0 is the usual value); off by default")
    noise_offset: float = option("noise offset (e.g. 0.05) for very dark / bright images", 0.0)
    use_ema: bool = option("keep an EMA of the trained weights (diffusers' EMAModel); written to output_dir/ema/ "
                           "beside the raw weights and used for the sample grids", False)
    ema_decay: float = option("largest EMA decay (diffusers' EMAModel: min(decay, (1+t)/(10+t)) at step t)",
                              0.9999)


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
    compile: bool = option("torch.compile the UNet's forward (dynamic=False; falls back to eager with a warning "
                           "where compiling fails); resume is then exact to a tolerance, not bit for bit", False)
    enable_xformers_memory_efficient_attention: bool = option(
        "accepted for diffusers' command lines: PyTorch's scaled-dot-product attention is always used", False)
    set_grads_to_none: bool = option("accepted: gradients are always set to None after a step", False)
    local_rank: int = option("accepted for torch.distributed.launch; the launcher's LOCAL_RANK is what counts", -1)
    dataloader_num_workers: int = option("accepted for compatibility; images are held in memory", 0)
    seed: int = option("seed of every random draw", 0)


@dataclass(kw_only=True)
class CheckpointOptions:
    output_dir: str = option("where the result, samples and checkpoints go", "lora-dreambooth-model")
    overwrite: bool = option("replace a finished run in output_dir (other files are kept)", False)
    checkpointing_steps: int = option("save a resumable checkpoint every N steps", 500)
    checkpoints_total_limit: int | None = option("keep at most this many checkpoints")
    resume_from_checkpoint: str | None = option("'latest' or a checkpoint-N folder to continue from")
    push_to_hub: bool = option("upload output_dir to a hub model repo at the end (checkpoints and logs left out)",
                               False)
    hub_model_id: str | None = option("the hub repo to push to; default: output_dir's folder name")
    hub_token: str | None = option("hub token for --push_to_hub; default: the one `hf auth login` saved")
    output_formats: str = option("LoRA file formats to write, comma-separated: diffusers, kohya, peft "
                                 "(DreamBooth always writes diffusers; ED-LoRA writes its concept file)",
                                 "diffusers")


@dataclass(kw_only=True)
class ValidationOptions:
    validation_prompt: str | None = option("prompt(s) for sample grids, separated by '|'; default: instance_prompt")
    num_validation_images: int = option("seeds per validation prompt (0 turns sample grids off)", 4)
    validation_steps: int | None = option("sample a grid every N steps (and always at the start and end)")
    validation_inference_steps: int = option("sampler steps of validation grids", 25)
    validation_guidance: float = option("classifier-free guidance of validation grids", 7.5)
    validation_epochs: int | None = option("as in diffusers: sample every N epochs (converted to steps; "
                                           "validation_steps wins)")


@dataclass(kw_only=True)
class TrackingOptions:
    report_to: str = option(f"tracker(s) through accelerate: {', '.join(REPORT_TO_CHOICES)}; tensorboard writes "
                            "under output_dir/logging_dir", "none")
    logging_dir: str = option("subfolder of output_dir for logs", "logs")
    preconditioner_log_steps: int = option(
        "log the condition numbers of B^T B and A A^T (median / max over LoRA pairs) to the trackers every N "
        "steps (0 = never); each costs an r x r eigendecomposition per factor", 10)


@dataclass(kw_only=True)
class TrainingOptions(TrackingOptions, ValidationOptions, CheckpointOptions, ScheduleOptions, OptimizerOptions,
                      LoRAOptions, DataOptions, ModelOptions):
    """Every shared group; a job's config subclasses this and adds its own fields.

    Bases are listed last group first: dataclass fields follow the reversed method resolution
    order, so ``--help`` and saved configs read model, data, LoRA, optimizer, ... in that order.
    """

    def validate_shared(self) -> None:
        """Checks of the shared options; a job's ``validate`` calls this first."""
        self.validate_data()
        if self.resolution <= 0 or self.resolution % 8:
            raise UserError(f"--resolution must be a positive multiple of 8, got {self.resolution}")
        # NaN passes every < / > test: without this a config built in code could train to NaN weights.
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise UserError(f"--max_grad_norm must be a finite number >= 0 (0 turns clipping off), "
                            f"got {self.max_grad_norm}")
        if not (0 <= self.ema_decay <= 1):  # also refuses NaN
            raise UserError(f"--ema_decay must be between 0 and 1, got {self.ema_decay}")
        if self.optimizer.lower() in ("adamw", "prodigy"):  # diffusers spells them AdamW / Prodigy
            self.optimizer = self.optimizer.lower()
        if self.optimizer not in OPTIMIZER_CHOICES:
            raise UserError(f"unknown --optimizer '{self.optimizer}'; valid: {', '.join(OPTIMIZER_CHOICES)}")
        if self.report_to not in REPORT_TO_CHOICES:
            raise UserError(f"unknown --report_to '{self.report_to}'; valid: {', '.join(REPORT_TO_CHOICES)}")
        from difflora.formats import parse_formats

        try:
            parse_formats(self.output_formats)
        except UserError as err:
            raise UserError(f"--output_formats: {err}") from None
        from difflora.tracking import check_optional_packages

        check_optional_packages(self)  # a tracker or optimizer package missing: one line, before any model
        from diffusers.optimization import SchedulerType

        schedules = [t.value for t in SchedulerType]
        if self.lr_scheduler not in schedules:
            raise UserError(f"unknown --lr_scheduler '{self.lr_scheduler}'; valid: {', '.join(schedules)}")
        check_bounds(self)
