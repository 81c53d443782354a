"""DreamBooth LoRA for SD 1.x / 2.x / SDXL with the scaled optimizers.

The loop is the shared engine's (:mod:`difflora.train.engine`); this module holds what DreamBooth
adds: its flags (those of diffusers' ``train_dreambooth_lora.py``, so existing command lines run
unchanged), LoRA on the UNet and optionally the text encoders, prior preservation with class
images, and its outputs (LoRA files in diffusers and kohya format, samples, scores, model card).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch import nn

from difflora.config import config_to_dict, parse_config
from difflora.data import load_image_set
from difflora.errors import UserError
from difflora.lora_io import KOHYA_WEIGHT_NAME, LORA_WEIGHT_NAME
from difflora.models import LORA_TARGET_PRESETS, BaseModel, add_lora
from difflora.output_dir import CHECKPOINT_PATTERN, Outputs, output_job, safetensors_metadata
from difflora.train.engine import Callback, Stream, Trainer, TrainingJob
from difflora.train.options import TrainingOptions, option

logger = logging.getLogger(__name__)

# Everything a run writes at the top of output_dir: what --overwrite replaces, and nothing else.
OUTPUTS = Outputs(
    "dreambooth", (LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME, "README.md", "samples", "loss.png", "metrics.json"),
    patterns=(CHECKPOINT_PATTERN,), marker=LORA_WEIGHT_NAME,
    recognise=lambda out: "difflora_version" in safetensors_metadata(out / LORA_WEIGHT_NAME))


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
    lora_targets: Literal["attention", "attention+ff", "all-linear"] = option(
        "layers to adapt: attention (diffusers), attention+ff, all-linear (kohya-like, 1x1 convs too)", "attention")
    train_text_encoder: bool = option("also train LoRA on the text encoder(s)", False)
    learning_rate: float = option("UNet LoRA learning rate", 1e-4)
    text_encoder_lr: float | None = option("text-encoder LoRA learning rate; default: learning_rate")
    use_8bit_adam: bool = option("shorthand for --optimizer adamw8bit (needs bitsandbytes)", False)
    output_kohya_format: bool = option("also write a kohya-format file for A1111 / ComfyUI", False)
    validation_epochs: int | None = option("as in diffusers: sample every N epochs (converted to steps)")
    clip_model: str | None = option("CLIP model (folder or hub id) for CLIP-T / CLIP-I scores in metrics.json")
    dataloader_num_workers: int = option("accepted for compatibility; images are held in memory", 0)

    def validate(self) -> None:
        if self.use_8bit_adam:
            self.optimizer = "adamw8bit"
        self.validate_shared()
        if not self.instance_prompt:
            raise UserError("missing --instance_prompt; give a prompt with a trigger word, e.g. 'a photo of sks dog'")
        if self.with_prior_preservation and not (self.class_data_dir and self.class_prompt):
            raise UserError("--with_prior_preservation needs --class_data_dir and --class_prompt")


class DreamBoothJob(TrainingJob):
    """LoRA on the UNet (and the text encoders when asked), instance images, optional prior classes."""

    name = "dreambooth"

    @property
    def alpha(self) -> float:
        return self.cfg.lora_alpha if self.cfg.lora_alpha is not None else float(self.cfg.rank)

    def outputs(self) -> Outputs:
        """TensorBoard logs count as outputs only when asked for, and only inside output_dir."""
        logs = Path(self.cfg.logging_dir)
        if self.cfg.report_to != "none" and not logs.is_absolute() and logs.parts and logs.parts[0] != "..":
            return OUTPUTS.with_names(logs.parts[0])
        return OUTPUTS

    def inputs(self) -> list[Any]:
        return [*super().inputs(), self.cfg.class_data_dir, self.cfg.clip_model]

    def load_data(self) -> list[Stream]:
        cfg = self.cfg
        self.instances = load_image_set(cfg.instance_data_dir, cfg.instance_prompt, cfg.resolution,
                                        center_crop=cfg.center_crop or cfg.cache_latents, random_flip=cfg.random_flip,
                                        captions=cfg.captions, seed=cfg.seed, mask_dir=cfg.mask_dir)
        return [Stream(self.instances)]

    def class_images(self, trainer: Trainer) -> Stream | None:
        from difflora.train.prior import ensure_class_images
        from difflora.train.validation import pipeline_from

        cfg, base = self.cfg, self.base
        if not cfg.with_prior_preservation:
            return None
        if trainer.accelerator.is_main_process:
            ensure_class_images(Path(cfg.class_data_dir), cfg.class_prompt, cfg.num_class_images,
                                lambda: pipeline_from(base, base.unet, base.text_encoders,
                                                      base.noise_scheduler.config),
                                cfg.resolution, cfg.seed)
        trainer.accelerator.wait_for_everyone()
        classes = load_image_set(cfg.class_data_dir, cfg.class_prompt, cfg.resolution, center_crop=cfg.center_crop,
                                 random_flip=cfg.random_flip, seed=cfg.seed + 1, what="class")
        return Stream(classes, cfg.prior_loss_weight)

    def attach(self, base: BaseModel) -> None:
        targets = LORA_TARGET_PRESETS[self.cfg.lora_targets]
        add_lora(base.unet, self.cfg.rank, self.alpha, targets["unet"])
        for i, enc in enumerate(self.trained_text_encoders()):
            add_lora(enc, self.cfg.rank, self.alpha, targets["text_encoder"])
            # Layers past those the family reads (SDXL: the first encoder's last layer) never get a
            # gradient; they stay out of the optimizer, and DDP (which refuses such) never sees them.
            used = base.family.text_layers_used(i, enc.config.num_hidden_layers)
            for name, p in enc.named_parameters():
                layer = re.search(r"\.layers\.(\d+)\.", name)
                if "lora_" in name and layer and int(layer.group(1)) >= used:
                    p.requires_grad_(False)

    def trained_text_encoders(self) -> list[nn.Module]:
        return list(self.base.text_encoders) if self.cfg.train_text_encoder else []

    def param_groups(self, lr_scale: float) -> list[dict[str, Any]]:
        cfg = self.cfg
        groups = [{"params": [(f"unet.{n}", p) for n, p in self.base.unet.named_parameters() if p.requires_grad],
                   "lr": cfg.learning_rate * lr_scale}]
        if cfg.train_text_encoder:
            te = [(f"text_encoder_{i}.{n}", p) for i, enc in enumerate(self.base.text_encoders)
                  for n, p in enc.named_parameters() if p.requires_grad]
            groups.append({"params": te, "lr": (cfg.text_encoder_lr or cfg.learning_rate) * lr_scale})
        return groups

    def identity(self) -> dict[str, Any]:
        return {"lora_targets": self.cfg.lora_targets, "train_text_encoder": self.cfg.train_text_encoder}

    def validation_prompts(self) -> list[str]:
        return [p.strip() for p in (self.cfg.validation_prompt or self.cfg.instance_prompt).split("|") if p.strip()]

    def save(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        from difflora.lora_io import save_lora
        from difflora.train.validation import write_metrics, write_model_card

        cfg, step, out = self.cfg, trainer.step, trainer.out
        unet, encoders = trainer.unwrapped()
        encoders = encoders if cfg.train_text_encoder else []
        save_lora(out, unet, encoders[0] if encoders else None, encoders[1] if len(encoders) > 1 else None,
                  kohya=cfg.output_kohya_format,
                  metadata={"base_model": cfg.pretrained_model_name_or_path, "instance_prompt": cfg.instance_prompt,
                            "optimizer": cfg.optimizer, "rank": cfg.rank, "alpha": self.alpha, "steps": step})
        metrics: dict[str, Any] = {"final_loss": summary["final_loss"], "steps": step, "seconds": summary["seconds"]}
        if cfg.clip_model:
            from difflora.data import load_image
            from difflora.evaluation import score_images

            reference = [load_image(p) for p in self.instances.paths]
            seeds = range(cfg.num_validation_images)
            prompts = [p for p in self.validation_prompts() for _ in seeds]
            for label, rows in (("before", trainer.before), ("after", trainer.after)):
                if rows is not None:
                    flat = [im for row in rows for im in row]
                    metrics[label] = score_images(flat, prompts, reference, cfg.clip_model, device=str(trainer.device))
        write_metrics(out / "metrics.json", metrics)
        card = config_to_dict(cfg) | {"max_train_steps": step}
        write_model_card(out, card, f"samples/step-{step}.png" if trainer.after is not None else None,
                         summary["final_loss"], license=self.base.family.license)
        summary["metrics"] = metrics


@output_job
def train(cfg: DreamBoothConfig, callbacks: list[Callback] | None = None) -> dict:
    """Run one DreamBooth LoRA training job; return a summary (final loss, steps, output_dir)."""
    return Trainer(DreamBoothJob(cfg), callbacks).run()


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(DreamBoothConfig, argv, prog="difflora dreambooth")
    summary = train(cfg)
    if summary["is_main_process"]:
        print(f"done: {summary['steps']} steps, final loss {summary['final_loss']:.4f}, "
              f"wrote {summary['output_dir']}")
