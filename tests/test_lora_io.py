"""LoRA files: what we write must load in stock diffusers and reproduce the trained model exactly."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

from difflora.errors import UserError
from difflora.lora_io import (
    KOHYA_WEIGHT_NAME,
    LORA_WEIGHT_NAME,
    apply_loras,
    kohya_name_to_path,
    lora_deltas,
    read_lora,
    read_lora_metadata,
    save_lora,
)

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


def _load(path, sdxl=False):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    kwargs = {} if sdxl else {"safety_checker": None, "requires_safety_checker": False}
    return cls.from_pretrained(path, **kwargs)


def _perturb(model, seed):
    """Make every lora_B nonzero so the LoRA changes outputs (peft initialises B to zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _add_lora(pipe, r=4, alpha=8, seed=0, text=True, rank_pattern=None):
    pipe.unet.add_adapter(LoraConfig(r=r, lora_alpha=alpha, target_modules=UNET_TARGETS,
                                     init_lora_weights="gaussian", rank_pattern=rank_pattern or {}))
    _perturb(pipe.unet, seed)
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) else [])
    if text:
        for i, te in enumerate(encoders):
            inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, target_modules=TE_TARGETS), te)
            _perturb(te, seed + 1 + i)


def _inputs(pipe, sdxl=False):
    g = torch.Generator().manual_seed(123)
    ids = torch.randint(0, 300, (2, 8), generator=g)
    sample = torch.randn(2, 4, 16, 16, generator=g)
    cross = pipe.unet.config.cross_attention_dim
    hidden = torch.randn(2, 8, cross, generator=g)
    extra = {}
    if sdxl:
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(2, 32, generator=g),
                                       "time_ids": torch.randn(2, 6, generator=g)}}
    return ids, sample, hidden, extra


@torch.no_grad()
def _outputs(pipe, sdxl=False):
    ids, sample, hidden, extra = _inputs(pipe, sdxl)
    out = {"unet": pipe.unet(sample, 10, hidden, **extra).sample, "te": pipe.text_encoder(ids)[0]}
    if sdxl:
        out["te2"] = pipe.text_encoder_2(ids)[0]
    return out


def _assert_same(a, b):
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5, msg=f"{k} differs")


def _assert_changed(a, b):
    for k in a:
        assert (a[k] - b[k]).abs().max() > 1e-3, f"LoRA did not change {k}"


@pytest.mark.parametrize("r,alpha", [(4, 4), (4, 8)])
def test_diffusers_and_kohya_files_reproduce_the_peft_model(tiny_sd, tmp_path, r, alpha):
    base = _outputs(_load(tiny_sd))
    pipe = _load(tiny_sd)
    _add_lora(pipe, r=r, alpha=alpha)
    trained = _outputs(pipe)
    _assert_changed(trained, base)

    files = save_lora(tmp_path, pipe.unet, pipe.text_encoder, kohya=True, metadata={"steps": 100, "note": "x"})
    assert [f.name for f in files] == [LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME]
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name]

    fresh = _load(tiny_sd)
    fresh.load_lora_weights(tmp_path)  # stock diffusers, default file name
    _assert_same(_outputs(fresh), trained)

    fresh = _load(tiny_sd)
    fresh.load_lora_weights(tmp_path, weight_name=KOHYA_WEIGHT_NAME)
    _assert_same(_outputs(fresh), trained)

    state, fmt = read_lora(tmp_path / KOHYA_WEIGHT_NAME)
    assert fmt == "kohya"
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert state[f"{key}.alpha"].item() == alpha
    assert state[f"{key}.lora_down.weight"].shape[0] == r
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in state
    state, fmt = read_lora(tmp_path)
    assert fmt == "diffusers"
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in state
    meta = read_lora_metadata(tmp_path)
    assert meta["steps"] == "100" and meta["note"] == "x" and json.loads(meta["difflora_alpha"]) == alpha
    assert meta["difflora_base_model"] == str(tiny_sd)


def test_deltas_agree_across_formats_and_with_the_model(tiny_sd, tmp_path):
    pipe = _load(tiny_sd)
    _add_lora(pipe, r=4, alpha=2, rank_pattern={"proj_in": 2})
    save_lora(tmp_path, pipe.unet, pipe.text_encoder, kohya=True)
    diff = lora_deltas(tmp_path / LORA_WEIGHT_NAME)
    koh = lora_deltas(tmp_path / KOHYA_WEIGHT_NAME)  # no model: names split by the compound table
    assert diff.keys() == koh.keys()
    for k in diff:
        torch.testing.assert_close(diff[k].delta(), koh[k].delta())
    # The delta of one layer equals what the peft layer adds to its base weight (a 1x1 conv here).
    name = "down_blocks.0.attentions.0.proj_in"
    layer = pipe.unet.get_submodule(name)
    x = torch.randn(1, layer.base_layer.in_channels, 4, 4)
    with torch.no_grad():
        expected = layer(x) - layer.base_layer(x)
    torch.testing.assert_close(torch.nn.functional.conv2d(x, diff[f"unet.{name}"].delta()), expected,
                               rtol=1e-4, atol=1e-5)
    assert diff[f"unet.{name}"].rank == 2 and diff[f"unet.{name}"].scale == 1.0
    assert diff["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"].scale == 0.5
    assert "text_encoder.text_model.encoder.layers.1.mlp.fc1" in diff

    # ... and a rank_pattern file still reloads exactly in stock diffusers, both formats.
    trained = _outputs(pipe)
    for weight_name in (LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME):
        fresh = _load(tiny_sd)
        fresh.load_lora_weights(tmp_path, weight_name=weight_name)
        _assert_same(_outputs(fresh), trained)


def test_alpha_override_keeps_outputs(tiny_sd, tmp_path):
    pipe = _load(tiny_sd)
    _add_lora(pipe, r=4, alpha=8, text=False)
    trained = _outputs(pipe)
    save_lora(tmp_path, pipe.unet, kohya=True, alpha=1.0)
    state, _ = read_lora(tmp_path / KOHYA_WEIGHT_NAME)
    assert {v.item() for k, v in state.items() if k.endswith(".alpha")} == {1.0}
    for weight_name in (LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME):
        fresh = _load(tiny_sd)
        fresh.load_lora_weights(tmp_path, weight_name=weight_name)
        _assert_same(_outputs(fresh), trained)


def test_peft_wrapped_text_encoder_and_peft_files(tiny_sd, tmp_path):
    """get_peft_model wrappers (base_model.model. names) save the same; peft folders load too."""
    from peft import get_peft_model

    pipe = _load(tiny_sd)
    pipe.text_encoder = get_peft_model(pipe.text_encoder, LoraConfig(r=2, lora_alpha=6, target_modules=TE_TARGETS))
    _perturb(pipe.text_encoder, 5)
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_k"]))
    _perturb(pipe.unet, 6)
    ids = torch.randint(0, 300, (1, 6))
    with torch.no_grad():
        want = pipe.text_encoder(input_ids=ids)[0]
    save_lora(tmp_path / "d", pipe.unet, pipe.text_encoder)
    pipe.text_encoder.save_pretrained(tmp_path / "p")
    assert read_lora(tmp_path / "p")[1] == "peft"

    for folder in ("d", "p"):
        fresh = _load(tiny_sd)
        apply_loras(fresh, [(tmp_path / folder, 1.0)])
        with torch.no_grad():
            torch.testing.assert_close(fresh.text_encoder(ids)[0], want, rtol=1e-5, atol=1e-5)


def test_sdxl_both_text_encoders(tiny_sdxl, tmp_path):
    pipe = _load(tiny_sdxl, sdxl=True)
    _add_lora(pipe, r=4, alpha=16)
    trained = _outputs(pipe, sdxl=True)
    save_lora(tmp_path, pipe.unet, pipe.text_encoder, pipe.text_encoder_2, kohya=True)
    state, _ = read_lora(tmp_path / KOHYA_WEIGHT_NAME)
    assert any(k.startswith("lora_te1_text_model_") for k in state)
    assert any(k.startswith("lora_te2_text_model_") for k in state)
    assert not any(k.startswith("lora_te_") for k in state)
    assert any(k.startswith("text_encoder_2.") for k in read_lora(tmp_path)[0])
    for weight_name in (LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME):
        fresh = _load(tiny_sdxl, sdxl=True)
        fresh.load_lora_weights(tmp_path, weight_name=weight_name)
        _assert_same(_outputs(fresh, sdxl=True), trained)


def test_apply_loras_merges_with_per_file_weights(tiny_sd, tmp_path):
    deltas = []
    for i, fmt_kohya in enumerate([False, True]):
        pipe = _load(tiny_sd)
        _add_lora(pipe, r=4, alpha=4 * (i + 1), seed=10 * i)
        save_lora(tmp_path / f"c{i}", pipe.unet, pipe.text_encoder, kohya=fmt_kohya)
        deltas.append(lora_deltas(tmp_path / f"c{i}" / LORA_WEIGHT_NAME))
    files = [tmp_path / "c0", tmp_path / "c1" / KOHYA_WEIGHT_NAME]

    base = _load(tiny_sd)
    name = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"
    w0 = base.unet.get_submodule(name).weight.detach().clone()
    adapters = apply_loras(base, [(files[0], 0.7), (files[1], -0.3)])
    assert adapters == ["c0", "c1"]

    key = f"unet.{name}"
    merged = w0 + 0.7 * deltas[0][key].delta() - 0.3 * deltas[1][key].delta()
    layer = base.unet.get_submodule(name)
    x = torch.randn(5, layer.in_features)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ merged.T, rtol=1e-5, atol=1e-5)
    te_name = "encoder.layers.0.self_attn.q_proj"
    te_layer = base.text_encoder.get_submodule(te_name)
    tkey = f"text_encoder.text_model.{te_name}"
    x = torch.randn(5, te_layer.in_features)
    w = te_layer.base_layer.weight + 0.7 * deltas[0][tkey].delta() - 0.3 * deltas[1][tkey].delta()
    with torch.no_grad():
        torch.testing.assert_close(te_layer(x), x @ w.T + te_layer.base_layer.bias, rtol=1e-5, atol=1e-5)


def test_mismatching_lora_names_the_layer(tiny_sd, tiny_sdxl, tmp_path):
    # An SDXL LoRA has cross_attention_dim 64: its attn2.to_k takes 64 inputs, SD's takes 32.
    xl = _load(tiny_sdxl, sdxl=True)
    xl.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["attn2.to_k"]))
    _perturb(xl.unet, 0)
    save_lora(tmp_path / "xl", xl.unet, kohya=True)
    pipe = _load(tiny_sd)
    for file in (tmp_path / "xl" / LORA_WEIGHT_NAME, tmp_path / "xl" / KOHYA_WEIGHT_NAME):
        with pytest.raises(UserError, match=r"layer 'unet\.down_blocks\.\d\.attentions\.0\.transformer_blocks"
                                            r"\.0\.attn2\.to_k'.*\(32, 32\)"):
            apply_loras(pipe, [(file, 1.0)])
    # Nothing was loaded by the failed calls.
    assert not any("lora" in n for n, _ in pipe.unet.named_modules())

    # A layer the base model lacks (SDXL's second transformer block) is named too.
    xl2 = _load(tiny_sdxl, sdxl=True)
    xl2.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["transformer_blocks.1.attn1.to_q"]))
    save_lora(tmp_path / "xl2", xl2.unet)
    with pytest.raises(UserError, match=r"transformer_blocks\.1\.attn1\.to_q' does not exist"):
        apply_loras(pipe, [(tmp_path / "xl2", 1.0)])


def test_bad_files_are_user_errors(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(UserError, match="does not exist"):
        read_lora(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(UserError, match="cannot read"):
        read_lora(tmp_path / "junk.safetensors")
    save_file({"conv.weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match="not a LoRA key"):
        read_lora(tmp_path / "model.safetensors")
    with pytest.raises(UserError, match="no LoRA layers"):
        save_lora(tmp_path / "out", torch.nn.Linear(2, 2))


def test_kohya_names_split_back():
    assert kohya_name_to_path("down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_out_0") == (
        "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0")
    assert kohya_name_to_path("text_model_encoder_layers_11_self_attn_out_proj") == (
        "text_model.encoder.layers.11.self_attn.out_proj")
    assert kohya_name_to_path("mid_block_resnets_0_time_emb_proj") == "mid_block.resnets.0.time_emb_proj"


def test_rslora_scale_survives_both_formats(tiny_sd, tmp_path):
    pipe = _load(tiny_sd)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["to_q", "to_v"]))
    _perturb(pipe.unet, 3)
    trained = _outputs(pipe)
    save_lora(tmp_path, pipe.unet, kohya=True)
    layer = lora_deltas(tmp_path)["unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert layer.scale == pytest.approx(8 / 2)  # alpha / sqrt(r), not alpha / r
    for weight_name in (LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME):
        fresh = _load(tiny_sd)
        fresh.load_lora_weights(tmp_path, weight_name=weight_name)
        _assert_same(_outputs(fresh), trained)


def test_unet_only_sdxl_lora_is_labelled_sdxl(tiny_sdxl, tmp_path):
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"]))
    save_lora(tmp_path, unet, kohya=True)  # no text encoder trained: the UNet alone says SDXL
    for name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors"):
        with safe_open(str(tmp_path / name), "pt") as f:
            meta = f.metadata()
        assert meta["difflora_model_type"] == "sdxl", name
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"  # what A1111 / ComfyUI read
