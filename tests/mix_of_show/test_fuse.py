"""Fusion pipeline on the tiny model: loads in stock diffusers, beats averaging, refuses bad input."""

from __future__ import annotations

import json

import pytest
import torch

from difflora.errors import UserError
from difflora.lora_io import apply_loras
from difflora.mix_of_show.fuse import CONCEPTS_FILE, REPORT_FILE, encode_prompts
from difflora.mix_of_show.fuse import main as fuse_main

WORDS = ["robot", "teddy bear"]  # as in conftest.py


def _load(path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)


def test_fused_folder_loads_in_stock_pipeline(fused_model):
    pipe = _load(fused_model)
    cfg = json.loads((fused_model / CONCEPTS_FILE).read_text())
    assert [c["words"] for c in cfg["concepts"]] == [[w] for w in WORDS]
    img = pipe("a photo of robot", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               height=32, width=32).images[0]
    assert img.size == (32, 32)
    report = json.loads((fused_model / REPORT_FILE).read_text())
    stages = {r["stage"] for r in report["layers"].values()}
    assert stages == {"text encoder", "cross-attention k/v", "UNet"}
    s = report["summary"]
    assert s["mean_error"] < 0.5 * s["mean_average_error"]


@pytest.mark.parametrize("which", [0, 1])
def test_text_features_closer_to_own_concept_than_average(two_concepts, fused_model, which):
    base, _, dirs = two_concepts
    prompt = [f"a photo of {WORDS[which]}"]
    with torch.no_grad():
        own = _load(base)
        apply_loras(own, [(dirs[which], 1.0)])
        target = encode_prompts(own, prompt)
        avg = _load(base)
        apply_loras(avg, [(dirs[0], 0.5), (dirs[1], 0.5)])  # W0 + mean of the two deltas
        fused = encode_prompts(_load(fused_model), prompt)
        averaged = encode_prompts(avg, prompt)
    d_fused = float((fused - target).norm())
    d_avg = float((averaged - target).norm())
    assert d_fused < d_avg, (d_fused, d_avg)


def _fuse(base, yaml_path, out, *extra):
    fuse_main(["--concepts", str(yaml_path), "--pretrained_model_name_or_path", str(base),
               "--output_dir", str(out), "--sample_steps", "1", "--prompt_templates", "{}", *extra])


def test_duplicate_words_refused(two_concepts, tmp_path):
    base, _, dirs = two_concepts
    y = tmp_path / "c.yaml"
    y.write_text(f"- lora: {dirs[0]}\n  words: robot\n- lora: {dirs[1]}\n  words: robot\n")
    with pytest.raises(UserError, match="both use the word 'robot'"):
        _fuse(base, y, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_concept_for_other_base_refused(two_concepts, tiny_sdxl, tmp_path):
    """The SD LoRAs do not fit the SDXL-layout UNet (its proj_in is a linear layer, the LoRA's a 1x1 conv):
    the message names the concept, the layer and the fix, and nothing is written."""
    from difflora.mix_of_show.fuse import FuseConfig, fuse

    base, yaml_path, _ = two_concepts
    with pytest.raises(UserError, match=r"^concept 1 \('.*c0.*'\) does not fit the base model: layer "
                                        r"'unet\..*proj_in' has weight .* but the LoRA has down .* / up .*; "
                                        r"use a LoRA trained on this base model$"):
        fuse(FuseConfig(concepts=str(yaml_path), pretrained_model_name_or_path=str(tiny_sdxl),
                        output_dir=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()


def test_existing_output_kept(two_concepts, tmp_path):
    base, yaml_path, _ = two_concepts
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        _fuse(base, yaml_path, out)
    assert (out / "keep.txt").read_text() == "mine"


def test_lbfgs_and_average_methods_run(two_concepts, tmp_path):
    base, yaml_path, _ = two_concepts
    errors = {}
    for method in ("average", "lbfgs"):
        _fuse(base, yaml_path, tmp_path / method, "--method", method, "--lbfgs_steps", "8")
        errors[method] = json.loads((tmp_path / method / REPORT_FILE).read_text())["summary"]["mean_error"]
    assert errors["lbfgs"] < errors["average"]
