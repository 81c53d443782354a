"""The shipped toy Stable Diffusion (assets/toy-sd): stock loading, drawing what is asked, and
the pretraining that rebuilds it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from difflora.errors import UserError
from difflora.toy.pretrain_sd import SDPretrainConfig, colour_shape_pairs, pretrain_sd
from difflora.toy.world import COLOURS, HELD_OUT, colour_fractions

ROOT = Path(__file__).resolve().parents[2]
TOY_SD, TOY_CLIP = ROOT / "assets" / "toy-sd", ROOT / "assets" / "toy-clip"
needs_model = pytest.mark.skipif(not (TOY_SD / "model_index.json").is_file(),
                                 reason="assets/toy-sd is missing; rebuild it: python scripts/pretrain_toy.py sd")


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def toy_pipe():
    pipe = StableDiffusionPipeline.from_pretrained(TOY_SD, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@needs_model
def test_stock_pipeline_loads_it_and_both_models_fit_the_budget(toy_pipe):
    assert _bytes(TOY_SD) + _bytes(TOY_CLIP) <= 25_000_000
    assert not list(TOY_SD.rglob("*.bin"))
    assert toy_pipe.vae_scale_factor == 4 and toy_pipe.unet.config.sample_size == 8
    image = toy_pipe("a red circle on a white background", num_inference_steps=5,
                     generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    summary = json.loads((TOY_SD / "pretrain_summary.json").read_text())
    assert summary["eval"]["train"]["n"] > 0 and summary["eval"]["held_out"]["n"] > 0


@needs_model
@pytest.mark.parametrize("colour", ["red", "green", "blue", "yellow", "purple", "orange", "pink", "brown", "black"])
def test_draws_the_prompted_colour(toy_pipe, colour):
    """Pixel check, independent of the CLIP judge: the prompted colour covers more of the image
    than any other shape colour (white background excluded).

    The first build failed it for yellow (drawn orange) and, before its decoder fine-tune, for
    green (dark olive); white is left out because it is the background.
    """
    gen = [torch.Generator().manual_seed(s) for s in range(3)]
    images = toy_pipe([f"a large {colour} square on a white background"] * 3, num_inference_steps=20,
                      guidance_scale=4.0, generator=gen).images
    wins = 0
    for image in images:
        fractions = {c: f for c, f in colour_fractions(image).items() if c in COLOURS and c != "white"}
        wins += max(fractions, key=fractions.get) == colour
    assert wins >= 2, colour


def test_held_out_pairs_are_split_off():
    held = colour_shape_pairs(held_out=True)
    assert set(held) == set(HELD_OUT)
    assert not set(held) & set(colour_shape_pairs(held_out=False))


def test_short_pretraining_lowers_the_loss_and_saves_a_stock_pipeline(tmp_path):
    cfg = SDPretrainConfig(out=str(tmp_path / "sd"), clip=str(TOY_CLIP), pool_size=64, vae_steps=6,
                           vae_batch_size=8, unet_channels="32,32", unet_steps=40, batch_size=16, lr=2e-3, decoder_steps=3,
                           warmup_steps=2, eval_every=20, eval_samples=0, threads=2)
    summary = pretrain_sd(cfg, progress=False)
    hist = summary["unet"]["history"]
    assert summary["unet"]["steps"] == 40 and len(hist) == 2
    assert hist[-1]["loss"] < hist[0]["loss"]
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "sd")
    stored = load_file(tmp_path / "sd" / "unet" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.float16}  # half the file...
    assert pipe.unet.dtype == torch.float32  # ...and still a float32 model by default
    assert pipe.vae.config.scaling_factor == pytest.approx(1 / summary["vae"]["latent_std"])
    out = pipe("a blue star", num_inference_steps=2, output_type="np").images
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()
    assert not (tmp_path / "sd.staging").exists()


def test_bad_settings_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="unet_channels"):
        pretrain_sd(SDPretrainConfig(out=str(tmp_path / "x"), clip=str(TOY_CLIP), unet_channels="30,60"))
    with pytest.raises(UserError, match="ema_decay"):
        pretrain_sd(SDPretrainConfig(out=str(tmp_path / "x"), clip=str(TOY_CLIP), ema_decay=1.0))
    with pytest.raises(UserError, match="no toy CLIP"):
        pretrain_sd(SDPretrainConfig(out=str(tmp_path / "x"), clip=str(tmp_path / "nope")))
    assert not (tmp_path / "x").exists()
