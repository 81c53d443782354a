"""Image loading: every format users hand us becomes the right RGB pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from difflora.data import find_images, load_image, load_image_set, resize_and_crop, to_tensor
from difflora.errors import UserError


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), "white")
    im.paste((255, 0, 0), (0, 0, 10, 20))  # red stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(tmp_path / "a.jpg", exif=exif, quality=100)
    out = load_image(tmp_path / "a.jpg")
    assert out.size == (20, 40)  # width and height swapped
    top = np.asarray(out)[:5].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[1] < 80  # the red stripe now runs along the top


def test_rgba_is_composited_on_white(tmp_path):
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "t.png")
    assert np.asarray(load_image(tmp_path / "t.png")).min() == 255


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    arr = np.full((8, 8), 32768, dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "g.png")
    px = np.asarray(load_image(tmp_path / "g.png"))
    assert px.shape == (8, 8, 3) and 125 <= px.mean() <= 130  # mid-grey, not white


def test_palette_and_grayscale_become_rgb(tmp_path):
    Image.new("P", (8, 8), 3).save(tmp_path / "p.png")
    Image.new("L", (8, 8), 90).save(tmp_path / "l.webp")
    assert load_image(tmp_path / "p.png").mode == "RGB"
    assert abs(int(np.asarray(load_image(tmp_path / "l.webp")).mean()) - 90) <= 2


def test_resize_and_center_crop_and_tensor_range():
    im = Image.new("RGB", (100, 50), (0, 0, 0))
    im.paste((255, 255, 255), (45, 0, 55, 50))  # a white bar in the middle
    out, (top, left) = resize_and_crop(im, 32, center_crop=True)
    assert out.size == (32, 32) and top == 0 and left == (64 - 32) // 2
    t = to_tensor(out)
    assert t.shape == (3, 32, 32) and t.min() >= -1 and t.max() <= 1
    assert t[:, :, 16].mean() > 0.9  # the bar stays in the centre


def test_augmentation_depends_only_on_seed_epoch_index(tmp_path):
    for i in range(3):
        Image.new("RGB", (48, 40), (i * 80, 0, 0)).save(tmp_path / f"{i}.png")
    a = load_image_set(tmp_path, "x", 32, random_flip=True, seed=1)
    b = load_image_set(tmp_path, "x", 32, random_flip=True, seed=1)
    assert a.order(0) == b.order(0)
    assert torch.equal(a.example(2, 5).pixel_values, b.example(2, 5).pixel_values)
    assert sorted(a.order(3)) == [0, 1, 2]


def test_captions_beside_images(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "0.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "1.png")
    (tmp_path / "0.txt").write_text("a sks dog on the beach\n")
    s = load_image_set(tmp_path, "a sks dog", 8, captions=True)
    assert s.prompts == ["a sks dog on the beach", "a sks dog"]


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        find_images(tmp_path / "nope")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="is empty"):
        find_images(tmp_path / "e")
