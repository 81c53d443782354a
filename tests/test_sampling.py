"""Sampling: images independent of batching, grid layout, `difflora sample` outputs and manifest
re-runs (pixel-equal), LoRA files applied, bad input -> one line, exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from difflora.cli import main as cli
from difflora.sampling import generate, load_pipeline, make_grid


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    """Exit code and the error line(s) (loaders' progress bars also go to stderr)."""
    with pytest.raises(SystemExit) as exc:
        cli(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return exc.value.code, "\n".join(line for line in err.splitlines() if ": error: " in line)


def pixels(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def pipe(tiny_sd):
    return load_pipeline(str(tiny_sd))


def test_image_of_prompt_and_seed_does_not_depend_on_batching(pipe):
    prompts, seeds = ["a star", "a dog on a beach"], [3, 7]
    together = generate(pipe, prompts, seeds, steps=2, batch_size=4, progress=False)
    alone = generate(pipe, prompts[1:], seeds[1:], steps=2, batch_size=1, progress=False)
    assert len(together) == 2 and all(len(row) == 2 for row in together)
    # batched convolutions may round differently in the last bit; nothing visible
    assert np.abs(pixels(together[1][1]) - pixels(alone[0][0])).max() <= 1
    assert np.abs(pixels(together[0][0]) - pixels(together[0][1])).mean() > 5  # seeds differ


def test_grid_size_and_layout():
    w, h = 16, 12
    colours = [[(255, 0, 0), (0, 255, 0), (0, 0, 255)], [(255, 255, 0), (0, 255, 255), (255, 0, 255)]]
    rows = [[Image.new("RGB", (w, h), c) for c in row] for row in colours]
    grid = make_grid(rows, ["first prompt", "second"], ["seed 0", "seed 1", "seed 2"], min_cell=0)
    label_w, top = grid.width - 3 * w, grid.height - 2 * h
    assert label_w > 0 and top > 0  # room for labels on the left and on top
    arr = np.asarray(grid)
    for i in range(2):
        for j in range(3):
            cell = arr[top + i * h: top + (i + 1) * h, label_w + j * w: label_w + (j + 1) * w]
            assert (cell == colours[i][j]).all(), (i, j)
    assert (arr[top: top + h, :label_w] != 255).any()  # the row label is drawn
    assert (arr[:top, label_w: label_w + w] != 255).any()  # the column label is drawn
    # Small images are enlarged by a whole factor for display: 16 x 12 -> 96 x 72, colours kept.
    big = np.asarray(make_grid(rows, ["first prompt", "second"], ["seed 0", "seed 1", "seed 2"], min_cell=96))
    big_label = big.shape[1] - 3 * 96  # the label column is about one (enlarged) cell wide
    assert 0 < big_label <= 1.5 * 96 + 40 and big.shape[0] == top + 2 * 72
    assert (big[top + 72: top + 144, big_label + 2 * 96: big_label + 3 * 96] == colours[1][2]).all()


def test_sample_writes_images_grid_manifest_and_manifest_reruns_pixel_equal(tiny_sd, tmp_path, capsys):
    out1, out2 = tmp_path / "s1", tmp_path / "s2"
    (tmp_path / "prompts.txt").write_text("# comment\na dog\n\n")
    cli(["sample", "--model", str(tiny_sd), "--prompt", "a star", "--prompts", str(tmp_path / "prompts.txt"),
         "--seeds", "0", "5", "--steps", "3", "--scheduler", "euler_a", "--guidance", "3", "--negative", "blurry",
         "--batch-size", "3", "--out", str(out1)])
    names = sorted(p.name for p in out1.iterdir())
    assert names == ["grid.png", "manifest.json", "p00-s0.png", "p00-s5.png", "p01-s0.png", "p01-s5.png"]
    manifest = json.loads((out1 / "manifest.json").read_text())
    assert manifest["settings"]["prompt"] == ["a star", "a dog"]
    assert manifest["settings"]["scheduler"] == "euler_a" and manifest["settings"]["negative"] == "blurry"
    assert [(e["prompt"], e["seed"]) for e in manifest["images"]] == [
        ("a star", 0), ("a star", 5), ("a dog", 0), ("a dog", 5)]
    tile = Image.open(out1 / "p00-s0.png")
    grid = Image.open(out1 / "grid.png")
    assert (grid.width - 2 * tile.width) > 0 and (grid.height - 2 * tile.height) > 0

    cli(["sample", "--manifest", str(out1 / "manifest.json"), "--out", str(out2)])  # from any folder
    for e in manifest["images"]:
        assert np.array_equal(pixels(Image.open(out1 / e["file"])), pixels(Image.open(out2 / e["file"]))), e
    assert np.array_equal(pixels(grid), pixels(Image.open(out2 / "grid.png")))


def _random_lora(model_dir, out_dir, seed: int):
    """A LoRA file with non-zero B factors, saved by difflora's own writer."""
    import torch

    from difflora.lora_io import save_lora
    from difflora.models import LORA_TARGET_PRESETS, add_lora, load_base_model

    base = load_base_model(str(model_dir))
    add_lora(base.unet, 4, 4.0, LORA_TARGET_PRESETS["attention"]["unet"])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in base.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    save_lora(out_dir, base.unet)
    return out_dir / "pytorch_lora_weights.safetensors"


def test_lora_changes_images_and_scale_zero_restores_base(tiny_sd, tmp_path):
    lora = _random_lora(tiny_sd, tmp_path / "lora", seed=0)
    common = ["--model", str(tiny_sd), "--prompt", "a star", "--seeds", "1", "--steps", "2"]
    cli(["sample", *common, "--out", str(tmp_path / "base")])
    cli(["sample", *common, "--lora", f"{lora}:1.0", "--out", str(tmp_path / "on")])
    cli(["sample", *common, "--lora", f"{lora}:0", "--out", str(tmp_path / "off")])
    base, on, off = (pixels(Image.open(tmp_path / d / "p00-s1.png")) for d in ("base", "on", "off"))
    assert np.abs(base - on).mean() > 1
    assert np.abs(base - off).max() <= 1


def test_bad_input_one_line_exit_2(tiny_sd, tiny_sdxl, tmp_path, capsys):
    out = tmp_path / "out"
    model = str(tiny_sd)
    code, err = run_cli(["sample", "--model", model, "--prompt", "a", "--scheduler", "plms", "--out", str(out)], capsys)
    assert code == 2 and "unknown scheduler 'plms'" in err and "ddim" in err and len(err.splitlines()) == 1

    code, err = run_cli(["sample", "--model", model, "--prompts", str(tmp_path / "none.txt"), "--out", str(out)],
                        capsys)
    assert code == 2 and "none.txt" in err and len(err.splitlines()) == 1

    code, err = run_cli(["sample", "--model", model, "--out", str(out)], capsys)
    assert code == 2 and "no prompt" in err

    code, err = run_cli(["sample", "--model", str(tmp_path), "--prompt", "a", "--out", str(out)], capsys)
    assert code == 2 and "model_index.json" in err and len(err.splitlines()) == 1

    code, err = run_cli(["sample", "--model", model, "--prompt", "a", "--lora", str(tmp_path / "x.safetensors"),
                         "--out", str(out)], capsys)
    assert code == 2 and "x.safetensors" in err and len(err.splitlines()) == 1

    xl_lora = _random_lora(tiny_sdxl, tmp_path / "xl-lora", seed=1)
    code, err = run_cli(["sample", "--model", model, "--prompt", "a", "--lora", str(xl_lora), "--steps", "1",
                         "--out", str(out)], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert "unet." in err or "down_blocks" in err or "up_blocks" in err or "mid_block" in err, err  # names a layer
    assert not out.exists()  # nothing written before the failure

    code, err = run_cli(["sample", "--manifest", str(tmp_path / "manifest.json")], capsys)
    assert code == 2 and "manifest" in err and len(err.splitlines()) == 1
