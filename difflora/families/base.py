"""The interface every model family implements (see :mod:`difflora.families`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Conditioning:
    """What the UNet reads besides the noisy latents: token states and family-specific extras."""

    hidden_states: torch.Tensor  # (B, T, D)
    pooled: torch.Tensor | None = None  # (B, D2) where the family uses a pooled text embedding

    def select(self, index: list[int]) -> Conditioning:
        return Conditioning(self.hidden_states[index], None if self.pooled is None else self.pooled[index])


class ModelFamily:
    """Base class: the Stable Diffusion 1.x / 2.x behaviour that most families share."""

    name: str = ""
    label: str = ""  # what users call it, for messages and model cards
    text_encoder_subfolders: tuple[str, ...] = ("text_encoder",)
    tokenizer_subfolders: tuple[str, ...] = ("tokenizer",)
    kohya_text_prefixes: tuple[str, ...] = ("lora_te_",)
    kohya_base_model_version: str = "sd_v1"
    license: str = "creativeml-openrail-m"  # the base weights' licence, for model cards
    lora_targets_unet: dict[str, list[str]] = {}

    @property
    def components(self) -> tuple[str, ...]:
        return ("unet", "vae", *self.text_encoder_subfolders, *self.tokenizer_subfolders, "scheduler")

    def matches(self, components: set[str]) -> bool:
        return set(self.components) <= components

    # -- loading ------------------------------------------------------------------------------------
    def text_encoder_classes(self) -> list[Any]:
        from transformers import CLIPTextModel

        return [CLIPTextModel]

    def pipeline_class(self) -> Any:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def pipeline(self, *, vae: Any, unet: Any, text_encoders: list[Any], tokenizers: list[Any],
                 scheduler: Any) -> Any:
        """A sampling pipeline around modules already in memory (e.g. those being trained)."""
        return self.pipeline_class()(vae=vae, text_encoder=text_encoders[0], tokenizer=tokenizers[0], unet=unet,
                                     scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                     requires_safety_checker=False)

    # -- conditioning -------------------------------------------------------------------------------
    def encode_prompts(self, tokenizers: list[Any], text_encoders: list[Any], prompts: list[str],
                       device: Any) -> Conditioning:
        tokenizer, encoder = tokenizers[0], text_encoders[0]
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        return Conditioning(encoder(ids)[0])

    def text_layers_used(self, index: int, num_layers: int) -> int:
        """How many of text encoder ``index``'s transformer layers (from the first) reach the
        conditioning; a LoRA on a later layer would never get a gradient (and DDP refuses such)."""
        return num_layers

    def unet_kwargs(self, cond: Conditioning, original_sizes: list[tuple[int, int]],
                    crops_top_left: list[tuple[int, int]], target_size: tuple[int, int],
                    dtype: torch.dtype, device: Any) -> dict[str, Any]:
        """Keyword arguments of the UNet call beyond (latents, timesteps, hidden states)."""
        return {}

    def pipeline_embeds(self, cond: Conditioning, negative: Conditioning | None = None) -> dict[str, Any]:
        """Keyword arguments that hand a pipeline call precomputed conditioning instead of prompt text
        (layer-wise prompts, regions: encodings the pipeline's own ``encode_prompt`` cannot make)."""
        out = {"prompt_embeds": cond.hidden_states}
        if negative is not None:
            out["negative_prompt_embeds"] = negative.hidden_states
        return out

    def zeros_for_empty_negative(self, pipe: Any) -> bool:
        """Whether the stock pipeline conditions on zeros when no negative prompt is given."""
        return False

    # -- pipelines in memory --------------------------------------------------------------------
    def load_pipeline(self, path: str | Any, **kwargs: Any) -> Any:
        """The family's pipeline from a diffusers folder (no safety checker: research sampling)."""
        return self.pipeline_class().from_pretrained(path, safety_checker=None, requires_safety_checker=False,
                                                     **kwargs)

    def adapter_pipeline(self, pipe: Any, adapter: Any) -> Any:
        """``pipe`` with a T2I-Adapter (keypose, sketch) steering its UNet."""
        from diffusers import StableDiffusionAdapterPipeline

        return StableDiffusionAdapterPipeline(
            vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
            adapter=adapter, scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)

    def text_encoders_of(self, pipe: Any) -> list[Any]:
        """A pipeline's text encoders, in the order of :attr:`text_encoder_subfolders`."""
        return [getattr(pipe, name) for name in self.text_encoder_subfolders]

    def tokenizers_of(self, pipe: Any) -> list[Any]:
        return [getattr(pipe, name) for name in self.tokenizer_subfolders]

    def kohya_prefix(self, component: str) -> str:
        if component == "unet":
            return "lora_unet_"
        index = 0 if component == "text_encoder" else int(component.rsplit("_", 1)[1]) - 1
        return self.kohya_text_prefixes[index]
