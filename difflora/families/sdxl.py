"""SDXL: two text encoders (penultimate states concatenated, pooled output of the second) and
size / crop conditioning through ``time_ids``."""

from __future__ import annotations

from typing import Any

import torch

from difflora.families.base import Conditioning, ModelFamily


class StableDiffusionXL(ModelFamily):
    name = "sdxl"
    label = "SDXL"
    text_encoder_subfolders = ("text_encoder", "text_encoder_2")
    tokenizer_subfolders = ("tokenizer", "tokenizer_2")
    kohya_text_prefixes = ("lora_te1_", "lora_te2_")
    kohya_base_model_version = "sdxl_base_v1-0"
    license = "openrail++"

    def text_encoder_classes(self) -> list[Any]:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        return [CLIPTextModel, CLIPTextModelWithProjection]

    def pipeline_class(self) -> Any:
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    def pipeline(self, *, vae: Any, unet: Any, text_encoders: list[Any], tokenizers: list[Any],
                 scheduler: Any) -> Any:
        return self.pipeline_class()(vae=vae, text_encoder=text_encoders[0], text_encoder_2=text_encoders[1],
                                     tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=unet,
                                     scheduler=scheduler)

    def encode_prompts(self, tokenizers: list[Any], text_encoders: list[Any], prompts: list[str],
                       device: Any) -> Conditioning:
        states, pooled = [], None
        for tokenizer, encoder in zip(tokenizers, text_encoders):
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(device)
            out = encoder(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder's projected pooled output
        return Conditioning(torch.cat(states, dim=-1), pooled)

    def text_layers_used(self, index: int, num_layers: int) -> int:
        # Token states come from the penultimate layer; only the last encoder's final layer counts
        # (through its pooled output).
        return num_layers if index == len(self.text_encoder_subfolders) - 1 else num_layers - 1

    def pipeline_embeds(self, cond: Conditioning, negative: Conditioning | None = None) -> dict[str, Any]:
        out = {**super().pipeline_embeds(cond, negative), "pooled_prompt_embeds": cond.pooled}
        if negative is not None:
            out["negative_pooled_prompt_embeds"] = negative.pooled
        return out

    def zeros_for_empty_negative(self, pipe: Any) -> bool:
        return bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False))

    def load_pipeline(self, path: str | Any, **kwargs: Any) -> Any:
        return self.pipeline_class().from_pretrained(path, **kwargs)  # SDXL ships no safety checker

    def adapter_pipeline(self, pipe: Any, adapter: Any) -> Any:
        from diffusers import StableDiffusionXLAdapterPipeline

        return StableDiffusionXLAdapterPipeline(
            vae=pipe.vae, text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2,
            tokenizer=pipe.tokenizer, tokenizer_2=pipe.tokenizer_2, unet=pipe.unet, adapter=adapter,
            scheduler=pipe.scheduler, force_zeros_for_empty_prompt=self.zeros_for_empty_negative(pipe))

    def unet_kwargs(self, cond: Conditioning, original_sizes: list[tuple[int, int]],
                    crops_top_left: list[tuple[int, int]], target_size: tuple[int, int],
                    dtype: torch.dtype, device: Any) -> dict[str, Any]:
        time_ids = torch.tensor([[*size, *crop, *target_size] for size, crop in zip(original_sizes, crops_top_left)],
                                dtype=dtype, device=device)
        return {"added_cond_kwargs": {"text_embeds": cond.pooled.to(dtype), "time_ids": time_ids}}
