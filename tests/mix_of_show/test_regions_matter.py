"""Region prompts and the T2I-Adapter condition change the sampled pixels, compared with the same run without.

Every run uses the same seed, so any difference comes from the feature under test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difflora.mix_of_show.regions import main as regions_main

PROMPT = "a photo of robot and teddy bear on the beach"


def _sample(model: Path, out: Path, *extra: str) -> np.ndarray:
    regions_main(["--model", str(model), "--prompt", PROMPT, "--steps", "2", "--seed", "0",
                  "--output_dir", str(out), *extra])
    return np.asarray(Image.open(out / "image.png").convert("RGB"), dtype=np.float64)


def test_each_region_changes_the_pixels_of_its_box(tiny_sd, tmp_path):
    plain = _sample(tiny_sd, tmp_path / "plain")
    assert np.array_equal(plain, _sample(tiny_sd, tmp_path / "again"))  # the comparison is noise-free
    both = _sample(tiny_sd, tmp_path / "both", "--region", "0,0,0.5,1|a red robot",
                   "--region", "16,0,32,32|a blue teddy bear|blurry")
    left, right = np.abs(both - plain)[:, :16], np.abs(both - plain)[:, 16:]
    assert left.mean() > 1.0 and right.mean() > 1.0  # out of 255: both boxes were redrawn
    # Where each prompt goes matters: the same two prompts in swapped boxes give other pixels in both.
    swapped = _sample(tiny_sd, tmp_path / "swapped", "--region", "0,0,0.5,1|a blue teddy bear|blurry",
                      "--region", "16,0,32,32|a red robot")
    assert np.abs(swapped - both)[:, :16].mean() > 1.0 and np.abs(swapped - both)[:, 16:].mean() > 1.0


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    """A tiny random full T2I-Adapter whose features fit the tiny UNet (32 and 64 channels, 16 and 8 px)."""
    from diffusers import T2IAdapter

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("adapter") / "t2i"
    T2IAdapter(in_channels=3, channels=[32, 64], num_res_blocks=1, downscale_factor=2,
               adapter_type="full_adapter").save_pretrained(path)
    return path


def test_adapter_condition_changes_the_image(tiny_sd, adapter_dir, tmp_path):
    rng = np.random.default_rng(0)
    conditions = []
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / name)
        conditions.append(tmp_path / name)
    with_a, with_b = (_sample(tiny_sd, tmp_path / f"out-{c.stem}", "--adapter", str(adapter_dir),
                              "--condition", str(c)) for c in conditions)
    assert np.abs(with_a - with_b).mean() > 1.0  # out of 255: the condition image steers the sample
    # With weight 0 the adapter adds nothing: the plain pipeline's image.
    off = _sample(tiny_sd, tmp_path / "off", "--adapter", str(adapter_dir), "--condition", str(conditions[0]),
                  "--adapter_weight", "0")
    plain = _sample(tiny_sd, tmp_path / "plain")
    assert np.abs(off - plain).max() <= 1.0
    assert np.abs(with_a - plain).mean() > 1.0
