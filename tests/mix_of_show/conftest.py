"""Two plain concept LoRAs on the tiny model, built once for the Mix-of-Show tests."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
WORDS = ["robot", "teddy bear"]


def _load(path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)


def make_concept_lora(base, out_dir, seed):
    """A LoRA whose weights are random (as if trained), saved in the diffusers format."""
    from difflora.lora_io import save_lora

    pipe = _load(base)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=UNET_TARGETS), pipe.unet)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=TE_TARGETS), pipe.text_encoder)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in (pipe.unet, pipe.text_encoder):
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    save_lora(out_dir, pipe.unet, pipe.text_encoder)
    return out_dir


@pytest.fixture(scope="session")
def two_concepts(tiny_sd, tmp_path_factory):
    """(base model, concepts.yaml, [lora dirs]) for two concepts with distinct words."""
    root = tmp_path_factory.mktemp("concepts")
    dirs = [make_concept_lora(tiny_sd, root / f"c{i}", seed=10 + i) for i in range(2)]
    yaml_path = root / "concepts.yaml"
    yaml_path.write_text("".join(f"- lora: {d}\n  words: {w}\n  scale: 1.0\n" for d, w in zip(dirs, WORDS)))
    return tiny_sd, yaml_path, dirs


@pytest.fixture(scope="session")
def fused_model(two_concepts, tmp_path_factory):
    from difflora.mix_of_show.fuse import main

    base, yaml_path, _ = two_concepts
    out = tmp_path_factory.mktemp("fused") / "model"
    main(["--concepts", str(yaml_path), "--pretrained_model_name_or_path", str(base), "--output_dir", str(out),
          "--sample_steps", "3", "--prompt_templates", "a photo of {}", "{} on the beach"])
    return out
