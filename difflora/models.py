"""Base models and LoRA attachment.

A Stable Diffusion checkpoint (hub id or local folder, SD 1.x / 2.x or SDXL) is loaded component
by component so the trainer can freeze, cast and wrap each one; LoRA adapters are injected with
peft's ``inject_adapter_in_model``, the mechanism diffusers' own loaders use, so saved files follow
the format ``pipe.load_lora_weights`` expects.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from difflora.errors import UserError
from difflora.families import ModelFamily, family_for

# Target presets: module-name suffixes that peft matches. "attention" is diffusers' default;
# "all-linear" follows kohya's LoRA-C3Lier-free default (every linear layer of the transformer
# blocks plus the 1x1 convolutions around them). "all-linear+conv" is LoCon / C3Lier: all-linear
# plus the 3x3 convolutions kohya adapts when given a conv_dim -- conv1 / conv2 of every ResNet
# block and the down- / upsamplers' conv. Like kohya, not conv_in / conv_out: they map to and from
# the 4 latent channels, where a rank-r update is nearly full rank and lives outside the blocks.
LORA_TARGET_PRESETS: dict[str, dict[str, list[str]]] = {
    "attention": {
        "unet": ["to_q", "to_k", "to_v", "to_out.0"],
        "text_encoder": ["q_proj", "k_proj", "v_proj", "out_proj"],
    },
    "attention+ff": {
        "unet": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"],
        "text_encoder": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    },
    "all-linear": {
        "unet": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
                 "conv_shortcut", "time_emb_proj"],
        "text_encoder": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    },
}
LORA_TARGET_PRESETS["all-linear+conv"] = {
    "unet": [*LORA_TARGET_PRESETS["all-linear"]["unet"], "conv1", "conv2", "conv"],
    "text_encoder": list(LORA_TARGET_PRESETS["all-linear"]["text_encoder"]),
}

@dataclass
class BaseModel:
    """The pieces of a Stable Diffusion checkpoint that training needs, and their family."""

    path: str
    unet: Any
    vae: Any
    noise_scheduler: Any
    family: ModelFamily
    tokenizers: list[Any] = field(default_factory=list)
    text_encoders: list[Any] = field(default_factory=list)

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def _check_local_folder(path: Path) -> ModelFamily:
    """Validate a local diffusers folder; return its family."""
    index = path / "model_index.json"
    if not index.is_file():
        raise UserError(f"'{path}' is not a diffusers model folder (no model_index.json); "
                        "pass a folder saved with save_pretrained or a hub id")
    try:
        declared = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"'{index}' is not valid JSON; re-save the model folder") from None
    if not isinstance(declared, dict):
        raise UserError(f"'{index}' is not a diffusers model index; re-save the model folder")
    family = family_for(set(declared))
    for name in family.components:
        if not (path / name).is_dir():
            raise UserError(f"the model folder '{path}' has no '{name}' component; "
                            f"copy the complete pipeline folder ({', '.join(family.components)})")
    return family


def load_base_model(path: str, revision: str | None = None, variant: str | None = None) -> BaseModel:
    """Load tokenizer(s), text encoder(s), VAE, UNet and a DDPM noise scheduler of any known family."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer

    local = Path(path)
    if local.exists():
        family = _check_local_folder(local)
    else:
        from huggingface_hub import model_info  # only reached for hub ids

        try:
            files = {s.rfilename for s in model_info(path, revision=revision).siblings}
        except Exception as err:  # noqa: BLE001 - any hub failure means "cannot use this id"
            raise UserError(f"cannot find model '{path}' locally or on the hub ({type(err).__name__}); "
                            "check the id or pass a local folder") from None
        family = family_for({f.split("/", 1)[0] for f in files if "/" in f})
    kw = dict(revision=revision)
    try:
        tokenizers = [AutoTokenizer.from_pretrained(path, subfolder=sub, **kw) for sub in family.tokenizer_subfolders]
        text_encoders = [cls.from_pretrained(path, subfolder=sub, variant=variant, **kw)
                         for cls, sub in zip(family.text_encoder_classes(), family.text_encoder_subfolders)]
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", variant=variant, **kw)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=variant, **kw)
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load model '{path}': {first}") from None
    return BaseModel(path=str(path), unet=unet, vae=vae, noise_scheduler=scheduler, family=family,
                     tokenizers=tokenizers, text_encoders=text_encoders)


def add_lora(module: nn.Module, rank: int, alpha: float, targets: list[str] | str, adapter_name: str = "default",
             use_dora: bool = False) -> int:
    """Attach a LoRA adapter to ``module`` and return how many layers it wraps.

    B starts at zero (the model is unchanged at step 0) and A Gaussian, as in diffusers.
    ``use_dora``: DoRA (Liu et al., 2024), peft's ``use_dora``: each layer also trains a magnitude
    vector ``lora_magnitude_vector`` (initialised to the base weight's norms, so again the model is
    unchanged at step 0). The scaled optimizers precondition only the ``lora_A`` / ``lora_B`` pair;
    the magnitude is not a factor pair and gets the plain AdamW / SGD rule.
    """
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets,
                        use_dora=use_dora)
    try:
        # peft itself, not transformers' ``add_adapter``: that integration gates on its own minimum
        # peft version (transformers 5.24 asks for a peft that is not released), and diffusers'
        # loaders inject the same way. The base weights stay frozen; only the adapter (lora_A / lora_B
        # and, with DoRA, lora_magnitude_vector) trains.
        inject_adapter_in_model(config, module, adapter_name=adapter_name)
    except ValueError as err:
        raise UserError(f"cannot attach LoRA to {type(module).__name__}: {str(err).splitlines()[0]}") from None
    return sum(1 for n, _ in module.named_modules() if n.endswith(f"lora_A.{adapter_name}"))
