"""Regional sampling: whole-image box == plain sampling with the region prompt; masks; bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from difflora.errors import UserError
from difflora.mix_of_show.regions import (
    Region,
    RegionController,
    box_mask,
    install_regions,
    parse_region,
)
from difflora.mix_of_show.regions import main as regions_main


def _load(path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)


def _encode(pipe, prompt):
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    return pipe.text_encoder(ids)[0]


def test_box_parsing_and_masks():
    r = parse_region("0,0,0.5,1|a red car|blurry", 32, 32)
    assert r.box == (0.0, 0.0, 16.0, 32.0) and r.prompt == "a red car" and r.negative_prompt == "blurry"
    assert parse_region("8,0,24,16|dog", 32, 32).box == (8.0, 0.0, 24.0, 16.0)
    m = box_mask((0, 0, 16, 32), 32, 32, 4, 4).view(4, 4)
    assert m[:, :2].eq(1).all() and m[:, 2:].eq(0).all()
    # A box smaller than a cell still covers the cell it starts in.
    assert box_mask((1, 1, 2, 2), 32, 32, 2, 2).tolist() == [1, 0, 0, 0]


@pytest.mark.parametrize("text,match", [
    ("0,0,40,16|dog", "outside"), ("0,0,0,16|dog", "zero area"), ("-1,0,8,8|dog", "outside"),
    ("0,0,8|dog", "4 numbers"), ("0,0,8,8", "x0,y0,x1,y1"),
])
def test_bad_boxes_refused(text, match):
    with pytest.raises(UserError, match=match):
        parse_region(text, 32, 32)


@torch.no_grad()
def test_whole_image_region_equals_plain_sampling(tiny_sd):
    pipe = _load(tiny_sd)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=3, height=32, width=32, guidance_scale=5.0, output_type="np",
              negative_prompt="blurry")
    plain = pipe("a red robot", generator=torch.Generator().manual_seed(0), **kw).images
    global_only = pipe("a blue car", generator=torch.Generator().manual_seed(0), **kw).images
    ctrl = RegionController(32, 32, guidance=True)
    ctrl.add(Region((0, 0, 32, 32), "a red robot"), _encode(pipe, "a red robot"), _encode(pipe, "blurry"))
    install_regions(pipe.unet, ctrl)
    regional = pipe("a blue car", generator=torch.Generator().manual_seed(0), **kw).images
    np.testing.assert_allclose(regional, plain, atol=1e-5)
    assert np.abs(global_only - plain).max() > 1e-3  # the test can fail: prompts matter

    # Half-image box: the left half follows the region prompt more than the right half does.
    ctrl.regions.clear()
    ctrl.add(Region((0, 0, 16, 32), "a red robot"), _encode(pipe, "a red robot"), _encode(pipe, "blurry"))
    half = pipe("a blue car", generator=torch.Generator().manual_seed(0), **kw).images
    assert not np.allclose(half, global_only, atol=1e-5)


def test_cli_two_regions_on_fused_model(fused_model, tmp_path):
    out = tmp_path / "out"
    regions_main(["--model", str(fused_model), "--prompt", "a photo of robot and teddy bear on the beach",
                  "--region", "0,0,0.5,1|a photo of robot", "--region", "16,0,32,32|a photo of teddy bear|blurry",
                  "--steps", "2", "--output_dir", str(out)])
    from PIL import Image

    assert Image.open(out / "image.png").size == (32, 32)
    assert min(Image.open(out / "layout.png").size) >= 256
    settings = json.loads((out / "settings.json").read_text())
    assert [r["box"] for r in settings["regions"]] == [[0.0, 0.0, 16.0, 32.0], [16.0, 0.0, 32.0, 32.0]]
    with pytest.raises(UserError, match="exists"):  # nothing overwritten by accident
        regions_main(["--model", str(fused_model), "--prompt", "x", "--steps", "1", "--output_dir", str(out)])


def test_cli_bad_input(fused_model, tmp_path):
    base = ["--model", str(fused_model), "--steps", "1", "--output_dir", str(tmp_path / "o")]
    with pytest.raises(UserError, match="unknown concept word '<potter1>'"):
        regions_main([*base, "--prompt", "a photo of <potter1>"])
    with pytest.raises(UserError, match="not a T2I-Adapter folder"):
        regions_main([*base, "--prompt", "robot", "--adapter", str(tmp_path / "nope"), "--condition",
                      str(tmp_path / "c.png")])
    layout = tmp_path / "l.json"
    layout.write_text(json.dumps({"prompt": "robot", "regions": [{"box": [0, 0, 64, 8], "prompt": "robot"}]}))
    with pytest.raises(UserError, match="outside"):
        regions_main([*base, "--layout", str(layout)])
    assert not (tmp_path / "o").exists()


def test_exit_code_two(fused_model, tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "difflora.cli", "sample-regions", "--model", str(fused_model),
                        "--prompt", "robot", "--region", "0,0,0,0|x", "--output_dir", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("difflora sample-regions: error:") and "zero area" in last
