"""Kohya files name modules the way the loaders look them up, for SD 1.x and SDXL.

The rules below are written from the loaders' own logic, not from our writer:

* ComfyUI (``comfy/lora.py`` ``model_lora_keys_unet`` + ``comfy/utils.py`` ``unet_to_diffusers``)
  accepts ``lora_unet_`` + the original (ldm) UNet path with ``_``, or ``lora_unet_`` + the diffusers
  path with ``_`` for the modules its diffusers map covers; text encoders only as
  ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` + ``text_model_encoder_layers_<i>_<self_attn_q_proj...>``.
* kohya sd-scripts (``networks/lora.py``) names a module ``prefix + "." + path`` with ``.`` -> ``_``,
  where the path is in the UNet class it trains: the diffusers layout for SD 1.x, the original (sgm)
  layout for SDXL (``sdxl_original_unet``), so an SDXL file with ``down_blocks`` names does not load there.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import load_file

from difflora.lora_io import KOHYA_WEIGHT_NAME, save_lora

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "time_emb_proj", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv"]
TOP_TARGETS = ["conv_in", "conv_out", "time_embedding.linear_1", "add_embedding.linear_2"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
# ComfyUI's LORA_CLIP_MAP: the text-encoder modules its kohya key map knows.
CLIP_MODULES = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                "self_attn.out_proj": "self_attn_out_proj"}


def comfy_unet_map(config) -> dict[str, str]:
    """{diffusers module: ldm module} as ComfyUI's ``unet_to_diffusers`` builds it from a UNet config."""
    levels = len(config.block_out_channels)
    per_level = config.layers_per_block
    depth = config.transformer_layers_per_block
    depth = [depth] * levels if isinstance(depth, int) else list(depth)
    down_attn = ["CrossAttn" in t for t in config.down_block_types]
    up_attn = ["CrossAttn" in t for t in config.up_block_types]
    resnet = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3",
              "conv_shortcut": "skip_connection"}

    def attention(blocks: int) -> list[str]:
        inner = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                 "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2"]
        return ["proj_in", "proj_out"] + [f"transformer_blocks.{t}.{m}" for t in range(blocks) for m in inner]

    out: dict[str, str] = {}
    for x in range(levels):
        n = 1 + (per_level + 1) * x
        for i in range(per_level):
            out.update({f"down_blocks.{x}.resnets.{i}.{d}": f"input_blocks.{n}.0.{o}" for d, o in resnet.items()})
            if down_attn[x]:
                out.update({f"down_blocks.{x}.attentions.{i}.{a}": f"input_blocks.{n}.1.{a}"
                            for a in attention(depth[x])})
            n += 1
        out[f"down_blocks.{x}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
    out.update({f"mid_block.attentions.0.{a}": f"middle_block.1.{a}" for a in attention(depth[-1])})
    for i, n in enumerate([0, 2]):
        out.update({f"mid_block.resnets.{i}.{d}": f"middle_block.{n}.{o}" for d, o in resnet.items()})
    up_depth = list(reversed(depth))
    for x in range(levels):
        n = (per_level + 1) * x
        for i in range(per_level + 1):
            c = 1
            out.update({f"up_blocks.{x}.resnets.{i}.{d}": f"output_blocks.{n}.0.{o}" for d, o in resnet.items()})
            if up_attn[x]:
                c = 2
                out.update({f"up_blocks.{x}.attentions.{i}.{a}": f"output_blocks.{n}.1.{a}"
                            for a in attention(up_depth[x])})
            if i == per_level:
                out[f"up_blocks.{x}.upsamplers.0.conv"] = f"output_blocks.{n}.{c}.conv"
            n += 1
    out.update({"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
                "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
                "add_embedding.linear_2": "label_emb.0.2"})
    return out


def _flat(path: str) -> str:
    return path.replace(".", "_")


def _trained(model) -> dict[str, torch.nn.Module]:
    """Modules that carry a LoRA, by their own (diffusers / transformers) path."""
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}


def _te_names(encoder, prefix: str) -> dict[str, str]:
    """ComfyUI's text-encoder keys for ``encoder``: key -> module path."""
    names = {}
    for b in range(encoder.config.num_hidden_layers):
        for module, flat in CLIP_MODULES.items():
            names[f"{prefix}text_model_encoder_layers_{b}_{flat}"] = f"encoder.layers.{b}.{module}"
    return names


def _lora_names(file) -> tuple[dict[str, torch.Tensor], set[str]]:
    state = load_file(str(file))
    suffixes = (".lora_down.weight", ".lora_up.weight", ".alpha", ".dora_scale")
    for key in state:
        assert key.endswith(suffixes), key
    return state, {k.split(".")[0] for k in state}


def _check_unet_key(state, name, module):
    """The key's factors fit the module the loader maps it to."""
    weight = module.base_layer.weight
    down, up = state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"]
    assert up.shape[0] == weight.shape[0] and down.shape[1] == weight.shape[1], name
    assert tuple(down.shape[2:]) == tuple(weight.shape[2:]), name


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd15", "sdxl"])
def test_every_kohya_key_maps_onto_a_module(tiny_sd, tiny_sdxl, tmp_path, sdxl):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if sdxl:
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
        encoders = {"lora_te1_": pipe.text_encoder, "lora_te2_": pipe.text_encoder_2}
    else:
        pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
        encoders = {"lora_te_": pipe.text_encoder}
    targets = UNET_TARGETS + TOP_TARGETS if sdxl else UNET_TARGETS + TOP_TARGETS[:3]
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=targets))
    for encoder in encoders.values():
        inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=TE_TARGETS), encoder)
    save_lora(tmp_path, pipe.unet, *encoders.values(), formats="kohya")
    state, names = _lora_names(tmp_path / KOHYA_WEIGHT_NAME)

    comfy = comfy_unet_map(pipe.unet.config)
    ldm_to_diffusers = {_flat(v): k for k, v in comfy.items()}
    diffusers_names = {_flat(k): k for k in comfy}
    unet_modules = _trained(pipe.unet)
    seen: set[str] = set()
    for name in sorted(n for n in names if n.startswith("lora_unet_")):
        flat = name[len("lora_unet_"):]
        if sdxl:
            # sd-scripts' SDXL UNet is the original one: no diffusers block names.
            assert not flat.startswith(("down_blocks", "mid_block", "up_blocks", "conv_in", "conv_out",
                                        "time_embedding", "add_embedding")), name
            path = ldm_to_diffusers.get(flat)
        else:
            # sd-scripts' SD 1.x UNet has diffusers module names; ComfyUI maps those too.
            path = diffusers_names.get(flat)
        assert path is not None, f"{name}: no ComfyUI key map entry"
        assert path in unet_modules, f"{name} -> {path}: not a trained module"
        _check_unet_key(state, name, unet_modules[path])
        seen.add(path)
    assert seen == set(unet_modules)  # every trained UNet module was written, under a name that loads

    for prefix, encoder in encoders.items():
        te_keys = _te_names(encoder, prefix)
        te_modules = {n.removeprefix("text_model."): m for n, m in _trained(encoder).items()}
        written = {n for n in names if n.startswith(prefix)}
        assert written and written <= set(te_keys), sorted(written - set(te_keys))[:3]
        assert {te_keys[n] for n in written} == set(te_modules)
    assert not any(n.startswith(("lora_te_", "lora_te1_", "lora_te2_")) and not n.startswith(tuple(encoders))
                   for n in names)


def test_sdxl_kohya_file_with_conv_layers_reloads_in_diffusers(tiny_sdxl, tmp_path):
    """diffusers maps the original-UNet names back itself (its sgm converter); the outputs must match."""
    from diffusers import StableDiffusionXLPipeline

    from difflora.lora_io import lora_deltas

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=UNET_TARGETS + TOP_TARGETS,
                                     init_lora_weights="gaussian"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pipe.unet.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(1, 4, 16, 16, generator=g), 10, torch.randn(1, 8, 64, generator=g))
    extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, 32, generator=g),
                                   "time_ids": torch.randn(1, 6, generator=g)}}
    with torch.no_grad():
        want = pipe.unet(*args, **extra).sample
    save_lora(tmp_path, pipe.unet, formats="kohya")
    fresh = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    fresh.load_lora_weights(tmp_path, weight_name=KOHYA_WEIGHT_NAME)
    with torch.no_grad():
        torch.testing.assert_close(fresh.unet(*args, **extra).sample, want, rtol=1e-4, atol=1e-4)
    # Our reader maps the original-UNet names back onto the model's modules.
    with_model = lora_deltas(tmp_path / KOHYA_WEIGHT_NAME, {"unet": [n for n, _ in fresh.unet.named_modules()]})
    assert set(with_model) == {f"unet.{n}" for n in _trained(pipe.unet)}
