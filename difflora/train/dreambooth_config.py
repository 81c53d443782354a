"""The options of ``difflora dreambooth``: diffusers' ``train_dreambooth_lora.py`` flags plus difflora's.

Kept apart from the job (:mod:`difflora.train.dreambooth`) so that reading them imports neither
torch nor diffusers: ``difflora dreambooth --help`` and a bad flag answer at once. Where a flag is
diffusers', so is its default (``docs/diffusers_flags.md`` lists every deliberate difference).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from difflora.errors import UserError
from difflora.train.options import TrainingOptions, option

logger = logging.getLogger("difflora.train.dreambooth")


@dataclass(kw_only=True)
class DreamBoothConfig(TrainingOptions):
    """Train a DreamBooth LoRA (flags as in diffusers' train_dreambooth_lora.py, plus difflora's)."""

    instance_prompt: str | None = option("prompt with the trigger word, e.g. 'a photo of sks dog'")
    captions: bool = option("use name.txt beside each image as its prompt (falls back to instance_prompt)", False)
    class_data_dir: str | None = option("folder of class images for prior preservation (generated if short)")
    class_prompt: str | None = option("prompt of the class, e.g. 'a photo of dog'")
    with_prior_preservation: bool = option("add the prior-preservation loss on class images", False)
    prior_loss_weight: float = option("weight of the prior-preservation loss", 1.0)
    num_class_images: int = option("class images wanted; missing ones are generated with the base model", 100)
    sample_batch_size: int = option("class images generated per batch", 4)
    prior_generation_precision: Literal["no", "fp32", "fp16", "bf16"] | None = option(
        "dtype of the pipeline that generates class images (no = fp32); default: fp16 on a GPU, else fp32")
    lora_targets: Literal["attention", "attention+ff", "all-linear", "all-linear+conv"] = option(
        "layers to adapt: attention (diffusers), attention+ff, all-linear (kohya-like, 1x1 convs too), "
        "all-linear+conv (LoCon: also the UNet's 3x3 ResNet and resampler convs)", "attention")
    lora_dropout: float = option("dropout on the LoRA input (peft's lora_dropout); > 0 draws from torch's global "
                                 "generator, so a resumed run is no longer bit-identical", 0.0)
    train_text_encoder: bool = option("also train LoRA on the text encoder(s)", False)
    learning_rate: float = option("UNet LoRA learning rate", 5e-4)
    lr_warmup_steps: int = option("warm-up steps of the LR schedule (constant ignores it, as in diffusers)", 500)
    text_encoder_lr: float | None = option("text-encoder LoRA learning rate; default: learning_rate")
    use_8bit_adam: bool = option("shorthand for --optimizer adamw8bit (needs bitsandbytes)", False)
    output_kohya_format: bool = option("also write a kohya-format file for A1111 / ComfyUI", False)
    validation_epochs: int | None = option("as in diffusers: sample every N epochs (converted to steps; "
                                           "validation_steps wins; null turns it off)", 50)
    validation_images: list[str] | None = option(
        "accepted: images for image-conditioned validation pipelines (DeepFloyd IF upscalers); the SD / SDXL "
        "grids are text-to-image, so they are not used")
    report_to: str = option("tracker(s) through accelerate: tensorboard, wandb, mlflow, comet_ml, ..., all, none; "
                            "tensorboard writes under output_dir/logging_dir", "tensorboard")
    pre_compute_text_embeddings: bool = option(
        "encode each prompt once (always done while the text encoders are frozen; refused with "
        "--train_text_encoder, as in diffusers)", False)
    tokenizer_max_length: int | None = option("tokens per prompt (SD 1.x / 2.x); default: the tokenizer's maximum")
    text_encoder_use_attention_mask: bool = option("pass the padding mask to the text encoder (SD 1.x / 2.x)",
                                                   False)
    class_labels_conditioning: str | None = option(
        "DeepFloyd IF's 'timesteps' class labels; SD / SDXL UNets take none, so only unset is valid")
    crops_coords_top_left_h: int | None = option("SDXL: crop top coordinate given to the size conditioning; "
                                                 "default: each image's real crop")
    crops_coords_top_left_w: int | None = option("SDXL: crop left coordinate given to the size conditioning; "
                                                 "default: each image's real crop")
    image_interpolation_mode: Literal["bilinear", "bicubic", "lanczos", "nearest", "nearest_exact", "box",
                                      "hamming"] = option(
        "accepted: difflora's loader always resizes with bicubic filtering (docs/diffusers_flags.md)", "lanczos")
    do_edm_style_training: bool = option("SDXL EDM-style training (Playground v2.5): not supported, refused", False)
    clip_model: str | None = option("CLIP model (folder or hub id) for CLIP-T / CLIP-I scores in metrics.json")

    def validate(self) -> None:
        if self.use_8bit_adam:
            if self.optimizer.lower() == "prodigy":  # diffusers ignores the flag with prodigy
                logger.warning("--use_8bit_adam is ignored with --optimizer prodigy")
            else:
                self.optimizer = "adamw8bit"
        self.validate_shared()
        if not self.instance_prompt:
            raise UserError("missing --instance_prompt; give a prompt with a trigger word, e.g. 'a photo of sks dog'")
        if self.with_prior_preservation and not (self.class_data_dir and self.class_prompt):
            raise UserError("--with_prior_preservation needs --class_data_dir and --class_prompt")
        if self.train_text_encoder and self.pre_compute_text_embeddings:
            raise UserError("--train_text_encoder cannot be used with --pre_compute_text_embeddings (the text "
                            "encoder changes every step); drop one of them")
        if self.class_labels_conditioning is not None:
            raise UserError("--class_labels_conditioning is for DeepFloyd IF UNets; SD / SDXL UNets take no class "
                            "labels, so leave it unset")
        if self.do_edm_style_training:
            raise UserError("--do_edm_style_training (EDM / Playground v2.5 models) is not supported; "
                            "train without it")
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"--lora_dropout must be >= 0 and < 1, got {self.lora_dropout}")
        if self.sample_batch_size <= 0:
            raise UserError(f"--sample_batch_size must be > 0, got {self.sample_batch_size}")
        if self.tokenizer_max_length is not None and self.tokenizer_max_length <= 0:
            raise UserError(f"--tokenizer_max_length must be > 0, got {self.tokenizer_max_length}")
        for name in ("crops_coords_top_left_h", "crops_coords_top_left_w"):
            if (getattr(self, name) or 0) < 0:
                raise UserError(f"--{name} must be >= 0, got {getattr(self, name)}")
