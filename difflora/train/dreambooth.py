"""DreamBooth LoRA for SD 1.x / 2.x / SDXL with the scaled optimizers.

The loop is the shared engine's (:mod:`difflora.train.engine`); this module holds what DreamBooth
adds: its flags (those of diffusers' ``train_dreambooth_lora.py``, so existing command lines run
unchanged), LoRA on the UNet and optionally the text encoders, prior preservation with class
images, and its outputs (LoRA files in diffusers and kohya format, samples, scores, model card).
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Any

from torch import nn

from difflora.config import config_to_dict, parse_config
from difflora.data import load_image_set, load_training_images
from difflora.errors import UserError
from difflora.formats import FORMATS
from difflora.lora_io import LORA_WEIGHT_NAME
from difflora.models import LORA_TARGET_PRESETS, BaseModel, add_lora
from difflora.output_dir import CHECKPOINT_PATTERN, Outputs, output_job, safetensors_metadata
from difflora.train.dreambooth_config import DreamBoothConfig
from difflora.train.engine import EMA_DIR, Callback, Stream, Trainer, TrainingJob

logger = logging.getLogger(__name__)

# Everything a run writes at the top of output_dir: what --overwrite replaces, and nothing else.
OUTPUTS = Outputs(
    "dreambooth", (*(f.output_name for f in FORMATS.values()), "README.md", "samples", "loss.png", "metrics.json",
                   EMA_DIR),
    patterns=(CHECKPOINT_PATTERN,), marker=LORA_WEIGHT_NAME,
    recognise=lambda out: "difflora_version" in safetensors_metadata(out / LORA_WEIGHT_NAME))


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
        return [*super().inputs(), self.cfg.class_data_dir, self.cfg.clip_model,
                self.cfg.pretrained_vae_model_name_or_path, self.cfg.tokenizer_name]

    def load_data(self) -> list[Stream]:
        cfg = self.cfg
        self.instances = load_training_images(cfg, cfg.instance_prompt, captions=cfg.captions)
        return [Stream(self.instances)]

    def class_images(self, trainer: Trainer) -> Stream | None:
        from difflora.train.prior import ensure_class_images
        from difflora.train.validation import pipeline_from

        cfg, base = self.cfg, self.base
        if not cfg.with_prior_preservation:
            return None
        if trainer.accelerator.is_main_process:
            def pipeline() -> Any:
                dtype = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}.get(
                    cfg.prior_generation_precision or "")
                if dtype is None:  # the training modules as they are (frozen weights in the training precision)
                    return pipeline_from(base, base.unet, base.text_encoders, base.noise_scheduler.config)
                import torch  # --prior_generation_precision: a pipeline of its own in that dtype, as in diffusers

                pipe = base.family.load_pipeline(cfg.pretrained_model_name_or_path, torch_dtype=getattr(torch, dtype),
                                                 revision=cfg.revision, variant=cfg.variant)
                pipe.set_progress_bar_config(disable=True)
                return pipe.to(trainer.device)

            ensure_class_images(Path(cfg.class_data_dir), cfg.class_prompt, cfg.num_class_images, pipeline,
                                cfg.resolution, cfg.seed, batch_size=cfg.sample_batch_size)
        trainer.accelerator.wait_for_everyone()
        classes = load_image_set(cfg.class_data_dir, cfg.class_prompt, cfg.resolution, center_crop=cfg.center_crop,
                                 random_flip=cfg.random_flip, seed=cfg.seed + 1, what="class")
        return Stream(classes, cfg.prior_loss_weight)

    def attach(self, base: BaseModel) -> None:
        targets = LORA_TARGET_PRESETS[self.cfg.lora_targets]
        add_lora(base.unet, self.cfg.rank, self.alpha, targets["unet"], use_dora=self.cfg.use_dora)
        for i, enc in enumerate(self.trained_text_encoders()):
            add_lora(enc, self.cfg.rank, self.alpha, targets["text_encoder"], use_dora=self.cfg.use_dora)
            # Layers past those the family reads (SDXL: the first encoder's last layer) never get a
            # gradient; they stay out of the optimizer, and DDP (which refuses such) never sees them.
            used = base.family.text_layers_used(i, enc.config.num_hidden_layers)
            for name, p in enc.named_parameters():
                layer = re.search(r"\.layers\.(\d+)\.", name)
                if "lora_" in name and layer and int(layer.group(1)) >= used:
                    p.requires_grad_(False)
        if self.cfg.lora_dropout:  # peft's lora_dropout, set after injection (add_lora builds without dropout)
            for module in (base.unet, *self.trained_text_encoders()):
                for layer in module.modules():
                    drop = getattr(layer, "lora_dropout", None)
                    if isinstance(drop, nn.ModuleDict) and "default" in drop:
                        drop["default"] = nn.Dropout(self.cfg.lora_dropout)
        if (self.cfg.tokenizer_max_length or self.cfg.text_encoder_use_attention_mask) and len(base.tokenizers) > 1:
            raise UserError("--tokenizer_max_length / --text_encoder_use_attention_mask are for SD 1.x / 2.x "
                            "(one text encoder), as in diffusers' train_dreambooth_lora.py; drop them for SDXL")
        limit = base.tokenizers[0].model_max_length
        if self.cfg.tokenizer_max_length and self.cfg.tokenizer_max_length > limit:
            raise UserError(f"--tokenizer_max_length {self.cfg.tokenizer_max_length} exceeds the text encoder's "
                            f"{limit} positions; use at most {limit}")

    def conditioning(self, prompts: list[str], text_encoders: list[nn.Module], device: Any) -> Any:
        """The family's conditioning, or diffusers' tokenizer_max_length / attention-mask variant (SD 1.x / 2.x)."""
        cfg = self.cfg
        if not (cfg.tokenizer_max_length or cfg.text_encoder_use_attention_mask):
            return super().conditioning(prompts, text_encoders, device)
        from difflora.families import Conditioning

        tokenizer = self.base.tokenizers[0]
        tokens = tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt",
                           max_length=cfg.tokenizer_max_length or tokenizer.model_max_length)
        mask = tokens.attention_mask.to(device) if cfg.text_encoder_use_attention_mask else None
        return Conditioning(text_encoders[0](tokens.input_ids.to(device), attention_mask=mask)[0])

    def trained_text_encoders(self) -> list[nn.Module]:
        return list(self.base.text_encoders) if self.cfg.train_text_encoder else []

    def param_groups(self, lr_scale: float) -> list[dict[str, Any]]:
        cfg = self.cfg
        groups = [{"params": [(f"unet.{n}", p) for n, p in self.base.unet.named_parameters() if p.requires_grad],
                   "lr": cfg.learning_rate * lr_scale}]
        if cfg.train_text_encoder:
            te = [(f"text_encoder_{i}.{n}", p) for i, enc in enumerate(self.base.text_encoders)
                  for n, p in enc.named_parameters() if p.requires_grad]
            groups.append({"params": te, "lr": (cfg.text_encoder_lr or cfg.learning_rate) * lr_scale,
                           **({} if cfg.adam_weight_decay_text_encoder is None
                              else {"weight_decay": cfg.adam_weight_decay_text_encoder})})
        return groups

    def identity(self) -> dict[str, Any]:
        return {"lora_targets": self.cfg.lora_targets, "train_text_encoder": self.cfg.train_text_encoder}

    def validation_prompts(self) -> list[str]:
        return [p.strip() for p in (self.cfg.validation_prompt or self.cfg.instance_prompt).split("|") if p.strip()]

    def save_weights(self, trainer: Trainer, folder: Path) -> list[Path]:
        from difflora.lora_io import save_lora

        cfg = self.cfg
        unet, encoders = trainer.unwrapped()
        encoders = encoders if cfg.train_text_encoder else []
        return save_lora(folder, unet, encoders[0] if encoders else None, encoders[1] if len(encoders) > 1 else None,
                         formats=f"diffusers,{cfg.output_formats}", kohya=cfg.output_kohya_format,
                         metadata={"base_model": cfg.pretrained_model_name_or_path,
                                   "instance_prompt": cfg.instance_prompt, "optimizer": cfg.optimizer,
                                   "rank": cfg.rank, "alpha": self.alpha, "steps": trainer.step,
                                   **({"ema": folder == trainer.out / EMA_DIR} if cfg.use_ema else {})})

    def save(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        from difflora.train.validation import write_metrics, write_model_card

        cfg, step, out = self.cfg, trainer.step, trainer.out
        self.save_weights(trainer, out)
        metrics: dict[str, Any] = {"final_loss": summary["final_loss"], "steps": step, "seconds": summary["seconds"]}
        if cfg.clip_model:
            from difflora.evaluation import score_images

            reference = list(self.instances.images)  # decoded once (a --dataset_name row has no file)
            seeds = range(cfg.num_validation_images)
            prompts = [p for p in self.validation_prompts() for _ in seeds]
            for label, rows in (("before", trainer.before), ("after", trainer.after)):
                if rows is not None:
                    flat = [im for row in rows for im in row]
                    metrics[label] = score_images(flat, prompts, reference, cfg.clip_model, device=str(trainer.device))
        write_metrics(out / "metrics.json", metrics)
        if cfg.report_to != "none" and any(k in metrics for k in ("before", "after")):
            from difflora.tracking import flat_scores

            trainer.accelerator.log(flat_scores({k: metrics[k] for k in ("before", "after") if k in metrics}),
                                    step=step)
        card = config_to_dict(cfg) | {"max_train_steps": step}
        write_model_card(out, card, f"samples/step-{step}.png" if trainer.after is not None else None,
                         summary["final_loss"], license=self.base.family.license)
        summary["metrics"] = metrics


@output_job
def train(cfg: DreamBoothConfig, callbacks: list[Callback] | None = None) -> dict:
    """Run one DreamBooth LoRA training job; return a summary (final loss, steps, output_dir)."""
    summary = Trainer(DreamBoothJob(cfg), callbacks).run()
    if cfg.push_to_hub and summary["is_main_process"]:
        from difflora.tracking import push_to_hub

        summary["hub_url"] = push_to_hub(Path(cfg.output_dir), cfg.hub_model_id, cfg.hub_token)
    return summary


def main(argv: list[str] | None = None) -> None:
    from difflora.console import pop_verbose, setup

    argv, verbose = pop_verbose(list(sys.argv[1:] if argv is None else argv))
    setup(verbose)  # quiet libraries, difflora's log lines on (train_dreambooth.py comes straight here)
    cfg = parse_config(DreamBoothConfig, argv, prog="difflora dreambooth")
    summary = train(cfg)
    if summary["is_main_process"]:
        print(f"done: {summary['steps']} steps, final loss {summary['final_loss']:.4f}, "
              f"wrote {summary['output_dir']}")
