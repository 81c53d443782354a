"""Image loading: every format users hand us becomes the right RGB pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from difflora.data import (
    CaptionRules,
    find_images,
    load_image,
    load_image_set,
    repeat_folder,
    resize_and_crop,
    shuffle_tags,
    to_tensor,
)
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


# ---- captions, repeats and kohya's N_name folders -----------------------------------------------


def test_caption_extension_and_caption_folder(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "0.png")
    (tmp_path / "0.txt").write_text("from txt")
    (tmp_path / "0.caption").write_text("from caption")
    assert load_image_set(tmp_path, "p", 8, captions=True).prompts == ["from txt"]
    assert load_image_set(tmp_path, "p", 8, captions=True, caption_ext=".caption").prompts == ["from caption"]
    assert load_image_set(tmp_path, "p", 8, captions=True, caption_ext="caption").prompts == ["from caption"]


def test_caption_dropout_and_tag_shuffle_are_per_seed_epoch_entry():
    rules = CaptionRules(dropout_rate=0.5, shuffle=True, keep_tokens=1)
    caption = "sks dog, red, blue, green, on grass"

    def draw(seed):
        return rules.apply(caption, torch.Generator().manual_seed(seed))

    out = [draw(s) for s in range(60)]
    assert out == [draw(s) for s in range(60)]  # a function of the generator's seed only
    dropped = out.count("")
    assert 15 < dropped < 45
    kept = [c for c in out if c]
    assert all(c.startswith("sks dog, ") for c in kept)  # the first tag stays in place
    assert all(sorted(c.split(", ")) == sorted(caption.split(", ")) for c in kept)
    assert len(set(kept)) > 3  # the other tags really move
    assert shuffle_tags("a photo of sks dog", 0, torch.Generator()) == "a photo of sks dog"


def test_image_set_varies_captions_by_epoch_not_by_call(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "0.png")
    (tmp_path / "0.txt").write_text("a, b, c, d, e, f")
    s = load_image_set(tmp_path, "p", 8, captions=True, caption_rules=CaptionRules(shuffle=True, keep_tokens=2))
    first = [s.example(0, e).prompt for e in range(8)]
    assert first == [s.example(0, e).prompt for e in range(8)]
    assert len(set(first)) > 1 and all(p.startswith("a, b, ") for p in first)
    # Crops and flips do not change when caption rules are added.
    plain = load_image_set(tmp_path, "p", 8, captions=True, random_flip=True)
    ruled = load_image_set(tmp_path, "p", 8, captions=True, random_flip=True,
                           caption_rules=CaptionRules(dropout_rate=0.5))
    assert all(torch.equal(plain.example(0, e).pixel_values, ruled.example(0, e).pixel_values) for e in range(4))


def test_repeats_list_each_image_n_times_with_own_crops(tmp_path):
    for i in range(3):
        Image.new("RGB", (48, 32), (i * 80, 0, 0)).save(tmp_path / f"{i}.png")
    s = load_image_set(tmp_path, "x", 32, repeats=4, seed=3)
    assert len(s) == 12 and len(s.images) == 3 and s.epoch_length(5) == 12
    assert sorted(s.order(0)) == list(range(12))
    crops = {s.example(j, 0).crop_top_left for j in range(4)}  # entries 0..3 are image 0
    assert len(crops) > 1  # each repetition is its own draw


def test_kohya_repeat_folders(tmp_path, caplog):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "top.png")
    (tmp_path / "10_sks dog").mkdir()
    Image.new("RGB", (8, 8), "green").save(tmp_path / "10_sks dog" / "a.png")
    Image.new("RGB", (8, 8), "green").save(tmp_path / "10_sks dog" / "b.png")
    (tmp_path / "10_sks dog" / "b.txt").write_text("sks dog on a sofa")
    (tmp_path / "3_my_cat").mkdir()
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "3_my_cat" / "c.png")
    (tmp_path / "0_off").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "0_off" / "d.png")
    (tmp_path / "notes").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "notes" / "e.png")
    assert repeat_folder("10_sks dog") == (10, "sks dog") and repeat_folder("3_my_cat") == (3, "my_cat")
    assert repeat_folder("notes") is None
    s = load_image_set(tmp_path, "a photo", 8, repeats=2, captions=True)
    names = [p.name for p in s.paths]
    assert names == ["top.png", "a.png", "b.png", "c.png"]
    assert s.repeats == [2, 10, 10, 3] and len(s) == 25
    assert s.prompts == ["a photo", "sks dog", "sks dog on a sofa", "my_cat"]
    assert "notes" in caplog.text and "0_off" in caplog.text
    # Only N_name folders: the top folder needs no image of its own.
    (tmp_path / "top.png").unlink()
    assert len(load_image_set(tmp_path, "a photo", 8).paths) == 3


def test_masks_of_images_in_repeat_folders(tmp_path):
    (tmp_path / "img" / "2_sks").mkdir(parents=True)
    (tmp_path / "masks" / "2_sks").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "img" / "2_sks" / "0.png")
    Image.new("L", (8, 8), 0).save(tmp_path / "masks" / "2_sks" / "0.png")
    s = load_image_set(tmp_path / "img", "p", 8, center_crop=True, mask_dir=tmp_path / "masks")
    assert float(s.example(1, 0).mask.max()) == 0.0
