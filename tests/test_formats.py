"""The format registry, DoRA and conv LoRA in every format, and the --output_formats option."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import load_file

from difflora.errors import UserError
from difflora.formats import FORMATS, detect, format_named, parse_formats
from difflora.lora_io import (
    KOHYA_WEIGHT_NAME,
    LORA_WEIGHT_NAME,
    apply_loras,
    collect_lora_layers,
    lora_deltas,
    output_names,
    save_lora,
)

UNET_TARGETS = ["to_q", "to_v", "proj_in", "conv1", "conv_shortcut", "downsamplers.0.conv"]
TE_TARGETS = ["q_proj", "fc1"]


def _load(path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)


def _perturb(model, seed):
    """Random factors and magnitudes, so LoRA and DoRA both change the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))


def _add(pipe, dora, seed=0):
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=6, use_dora=dora, target_modules=UNET_TARGETS,
                                     init_lora_weights="gaussian"))
    _perturb(pipe.unet, seed)
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, use_dora=dora, target_modules=TE_TARGETS), pipe.text_encoder)
    _perturb(pipe.text_encoder, seed + 1)


@torch.no_grad()
def _outputs(pipe):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 300, (2, 8), generator=g)
    sample = torch.randn(2, 4, 16, 16, generator=g)
    hidden = torch.randn(2, 8, pipe.unet.config.cross_attention_dim, generator=g)
    return {"unet": pipe.unet(sample, 10, hidden).sample, "te": pipe.text_encoder(ids)[0]}


def _assert_same(a, b, tol=1e-4):
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol, msg=f"{k} differs")


# ---- the registry ------------------------------------------------------------------------------


def test_registry_names_and_errors():
    assert list(FORMATS) == ["diffusers", "kohya", "peft"]
    assert [f.name for f in parse_formats(" kohya,diffusers ,kohya")] == ["kohya", "diffusers"]
    with pytest.raises(UserError, match=r"unknown LoRA format 'onnx'; valid: diffusers, kohya, peft$"):
        format_named("onnx")
    assert detect(["lora_unet_x.lora_down.weight", "lora_unet_x.alpha"]).name == "kohya"
    assert detect(["unet.x.lora_A.weight"]).name == "diffusers"
    assert detect(["base_model.model.x.lora_A.weight"]).name == "peft"
    assert output_names("diffusers,kohya,peft") == (LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME, "peft")


def test_output_formats_option_is_checked():
    from difflora.train.dreambooth_config import DreamBoothConfig

    cfg = DreamBoothConfig(pretrained_model_name_or_path="m", instance_data_dir="imgs", instance_prompt="a sks dog",
                           output_formats="diffusers,kohy")
    with pytest.raises(UserError) as err:
        cfg.validate()
    assert str(err.value) == "--output_formats: unknown LoRA format 'kohy'; valid: diffusers, kohya, peft"


# ---- DoRA and conv LoRA --------------------------------------------------------------------------


@pytest.mark.parametrize("dora", [False, True])
def test_every_format_round_trips_dora_and_conv(tiny_sd, tmp_path, dora):
    pipe = _load(tiny_sd)
    _add(pipe, dora)
    live = {**collect_lora_layers(pipe.unet, "unet"), **collect_lora_layers(pipe.text_encoder, "text_encoder")}
    conv = live["unet.down_blocks.0.resnets.0.conv1"]
    assert conv.down.shape == (2, 32, 3, 3) and conv.up.shape == (32, 2, 1, 1)
    assert (conv.magnitude is not None) == dora and (conv.magnitude is None or conv.magnitude.shape == (32,))
    files = save_lora(tmp_path, pipe.unet, pipe.text_encoder, formats="diffusers,kohya,peft")
    assert {f.relative_to(tmp_path).as_posix() for f in files} == {
        LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME, "peft/unet/adapter_model.safetensors", "peft/unet/adapter_config.json",
        "peft/text_encoder/adapter_model.safetensors", "peft/text_encoder/adapter_config.json"}
    for source in (tmp_path / LORA_WEIGHT_NAME, tmp_path / KOHYA_WEIGHT_NAME, tmp_path / "peft" / "unet",
                   tmp_path / "peft" / "text_encoder"):
        back = lora_deltas(source)
        assert back, source
        for key, layer in back.items():
            want = live[key]
            assert layer.scale * layer.up.float() == pytest.approx(want.scale * want.up.float(), abs=1e-6), key
            assert torch.equal(layer.down, want.down), key
            if dora:
                assert torch.equal(layer.magnitude, want.magnitude), key
            else:
                assert layer.magnitude is None


def test_dora_and_conv_files_load_in_stock_diffusers(tiny_sd, tmp_path):
    pipe = _load(tiny_sd)
    _add(pipe, dora=True)
    trained = _outputs(pipe)
    save_lora(tmp_path, pipe.unet, pipe.text_encoder, formats="diffusers,kohya,peft")
    state = load_file(str(tmp_path / LORA_WEIGHT_NAME))
    key = "unet.down_blocks.0.resnets.0.conv1"
    assert state[f"{key}.lora_A.weight"].shape == (2, 32, 3, 3)
    assert state[f"{key}.lora_magnitude_vector.weight"].shape == (1, 32, 1, 1)  # peft's conv shape
    assert state["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_magnitude_vector.weight"].shape == (32,)

    fresh = _load(tiny_sd)
    fresh.load_lora_weights(tmp_path)  # stock diffusers, default file name: DoRA from the header
    _assert_same(_outputs(fresh), trained)

    for source in (tmp_path / KOHYA_WEIGHT_NAME, tmp_path / LORA_WEIGHT_NAME):  # our reader, any format
        fresh = _load(tiny_sd)
        apply_loras(fresh, [(source, 1.0)])
        _assert_same(_outputs(fresh), trained)


def test_kohya_dora_scale_follows_comfyui(tiny_sd, tmp_path):
    """``dora_scale`` of shape (out, 1[, 1, 1]) is ComfyUI's output-axis DoRA; merging by that rule
    gives the weight the peft layer computes with."""
    pipe = _load(tiny_sd)
    _add(pipe, dora=True)
    save_lora(tmp_path, pipe.unet, pipe.text_encoder, formats="kohya")
    state = load_file(str(tmp_path / KOHYA_WEIGHT_NAME))
    cases = {"down_blocks.0.resnets.0.conv1": "lora_unet_down_blocks_0_resnets_0_conv1",
             "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v":
                 "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v"}
    for path, name in cases.items():
        layer = pipe.unet.get_submodule(path)
        w0 = layer.base_layer.weight.detach()
        dora = state[f"{name}.dora_scale"]
        assert dora.shape == (w0.shape[0],) + (1,) * (w0.dim() - 1)  # (out, 1) or (out, 1, 1, 1)
        # The loader's rule: lora_diff = up.flatten(1) @ down.flatten(1), scaled by alpha / rank; a
        # dora_scale whose first dimension is the output channels normalises each output row.
        up, down = state[f"{name}.lora_up.weight"], state[f"{name}.lora_down.weight"]
        scale = state[f"{name}.alpha"].item() / down.shape[0]
        merged = w0 + scale * (up.flatten(1) @ down.flatten(1)).reshape(w0.shape)
        merged = merged * dora / merged.flatten(1).norm(dim=1).view(dora.shape)
        x = torch.randn(2, *((w0.shape[1], 8, 8) if w0.dim() == 4 else (5, w0.shape[1])))
        with torch.no_grad():
            if w0.dim() == 4:
                expected = F.conv2d(x, merged, layer.base_layer.bias, layer.base_layer.stride,
                                    layer.base_layer.padding)
            else:
                expected = F.linear(x, merged, layer.base_layer.bias)
            torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)
        # ... and the normalised view's dense delta is the same merged weight.
        delta = lora_deltas(tmp_path / KOHYA_WEIGHT_NAME)[f"unet.{path}"].delta(w0)
        torch.testing.assert_close(w0 + delta, merged, rtol=1e-5, atol=1e-6)


def test_column_wise_dora_scale_is_refused(tmp_path):
    state = {"lora_unet_x.lora_down.weight": torch.zeros(2, 8), "lora_unet_x.lora_up.weight": torch.zeros(4, 2),
             "lora_unet_x.dora_scale": torch.ones(1, 8)}
    with pytest.raises(UserError, match="per-input-column DoRA"):
        lora_deltas(state)


def test_dora_delta_needs_the_base_weight(tiny_sd, tmp_path):
    pipe = _load(tiny_sd)
    _add(pipe, dora=True)
    layer = collect_lora_layers(pipe.unet, "unet")["unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q"]
    with pytest.raises(UserError, match="depends on the base weight"):
        layer.delta()


def test_peft_folders_load_with_peft(tiny_sd, tmp_path):
    from peft import PeftModel, set_peft_model_state_dict

    pipe = _load(tiny_sd)
    _add(pipe, dora=True)
    trained = _outputs(pipe)
    save_lora(tmp_path, pipe.unet, pipe.text_encoder, formats="peft", metadata={"steps": 3})
    config = json.loads((tmp_path / "peft" / "unet" / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["peft_type"] == "LORA"

    fresh = _load(tiny_sd)
    fresh.text_encoder = PeftModel.from_pretrained(fresh.text_encoder, tmp_path / "peft" / "text_encoder")
    inject_adapter_in_model(LoraConfig.from_pretrained(tmp_path / "peft" / "unet"), fresh.unet)
    result = set_peft_model_state_dict(fresh.unet, load_file(str(tmp_path / "peft" / "unet" / "adapter_model.safetensors")))
    assert not result.unexpected_keys
    _assert_same(_outputs(fresh), trained)


def test_mixed_dora_and_lora_in_one_component_is_refused():
    from difflora.formats import LoraLayer

    plain = LoraLayer(torch.zeros(2, 4), torch.zeros(4, 2), 1.0)
    dora = LoraLayer(torch.zeros(2, 4), torch.zeros(4, 2), 1.0, magnitude=torch.ones(4))
    with pytest.raises(UserError, match="mixes DoRA and plain LoRA"):
        format_named("diffusers").encode({"unet.a": plain, "unet.b": dora})
    tensors, _ = format_named("diffusers").encode({"unet.a": plain, "text_encoder.b": dora})  # per component: fine
    assert "text_encoder.b.lora_magnitude_vector.weight" in tensors
