"""Aspect-ratio buckets: the sizes, which image goes where, and an order that never mixes them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from difflora.data import Buckets, ImageSet, bucket_order, load_image_set
from difflora.errors import UserError

SHAPES = {"wide": (96, 48), "tall": (40, 80), "square": (50, 50)}  # (w, h)


def test_bucket_sizes_follow_the_rules():
    b = Buckets.make(512, 256, 1024, 64)
    assert (512, 512) in b.sizes and (1024, 256) in b.sizes and (256, 1024) in b.sizes
    assert (768, 320) in b.sizes and (320, 768) in b.sizes
    for w, h in b.sizes:
        assert w % 64 == 0 and h % 64 == 0 and 256 <= min(w, h) and max(w, h) <= 1024 and w * h <= 512 * 512
    assert set(b.sizes) == {(h, w) for w, h in b.sizes}  # every bucket and its transpose
    small = Buckets.make(32, 16, 64, 8)
    assert small.sizes == ((16, 48), (16, 56), (16, 64), (24, 40), (32, 32), (40, 24), (48, 16), (56, 16), (64, 16))


def test_nearest_aspect_ratio():
    b = Buckets.make(32, 16, 64, 8)
    assert b.nearest(96, 48) == (40, 24)  # 2.0 -> 1.67 (64x16 is 4.0)
    assert b.nearest(40, 80) == (24, 40)
    assert b.nearest(50, 50) == (32, 32)
    assert b.nearest(1000, 240) == (64, 16)


@pytest.mark.parametrize("args, match", [
    ((32, 16, 64, 12), "multiple of 8"),
    ((32, 20, 64, 8), "--min_bucket_reso"),
    ((32, 40, 64, 8), "between"),
])
def test_bad_bucket_settings_are_one_line(args, match):
    with pytest.raises(UserError, match=match):
        Buckets.make(*args)


def test_order_groups_one_bucket_per_batch_and_covers_every_example():
    bucket_of = [0, 1, 2, 0, 1, 0, 0, 2, 1]
    for batch in (1, 2, 3, 4):
        order = bucket_order(bucket_of, batch, torch.Generator().manual_seed(5))
        assert len(order) % batch == 0
        groups = [order[i:i + batch] for i in range(0, len(order), batch)]
        assert all(len({bucket_of[i] for i in g}) == 1 for g in groups)
        assert set(order) == set(range(len(bucket_of)))
        assert order == bucket_order(bucket_of, batch, torch.Generator().manual_seed(5))


@pytest.fixture
def mixed(tmp_path):
    """Two wide, two tall and one square image, each a different solid colour."""
    colours = {"w0": "red", "w1": "orange", "t0": "green", "t1": "teal", "s0": "blue"}
    for name, colour in colours.items():
        Image.new("RGB", SHAPES[{"w": "wide", "t": "tall", "s": "square"}[name[0]]], colour).save(
            tmp_path / f"{name}.png")
    return tmp_path


def test_bucketed_examples_have_their_bucket_shape_and_batches_never_mix(mixed):
    s = load_image_set(mixed, "x", 32, random_flip=True, seed=2, buckets=Buckets.make(32, 16, 64, 8))
    expect = {"w": (24, 40), "t": (40, 24), "s": (32, 32)}  # (h, w) of the pixels
    assert s.epoch_length(2) == 6  # 2 + 2 + 1 rounded up to a whole pair
    for epoch in range(3):
        examples = [s.draw(epoch * 6 + j, 2) for j in range(6)]
        order = s.order(epoch, 2)
        for j, ex in enumerate(examples):
            assert tuple(ex.pixel_values.shape[1:]) == expect[s.paths[s.entries[order[j]]].stem[0]]
            assert ex.target_size == tuple(ex.pixel_values.shape[1:])
        for j in range(0, 6, 2):
            assert examples[j].pixel_values.shape == examples[j + 1].pixel_values.shape
    # Unbucketed, everything is the square.
    plain = load_image_set(mixed, "x", 32)
    assert {tuple(plain.example(i, 0).pixel_values.shape[1:]) for i in range(5)} == {(32, 32)}


def test_crop_and_original_size_are_the_real_ones(tmp_path):
    """SDXL conditioning: (h, w) as read, and where the crop lies in the resized (flipped) image."""
    arr = np.zeros((100, 200, 3), np.uint8)
    arr[:, :, 0] = np.arange(200)[None, :]  # red ramp left -> right
    Image.fromarray(arr).save(tmp_path / "ramp.png")
    b = Buckets.make(32, 16, 64, 8)
    assert b.nearest(200, 100) == (40, 24)  # covered at 48x24, so the crop moves sideways
    resized = Image.fromarray(arr).resize((48, 24), Image.Resampling.BICUBIC)
    mirrored = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    lefts, flips = set(), set()
    for flip in (False, True):
        s = ImageSet([tmp_path / "ramp.png"], ["p"], 32, random_flip=flip, seed=0, buckets=b)
        for epoch in range(8):
            ex = s.example(0, epoch)
            assert ex.original_size == (100, 200) and ex.target_size == (24, 40)
            top, left = ex.crop_top_left
            seen = ((ex.pixel_values + 1) * 127.5).round().byte().permute(1, 2, 0).numpy().astype(int)
            was_flipped = seen[0, 0, 0] > seen[0, -1, 0]
            source = np.asarray(mirrored if was_flipped else resized).astype(int)
            assert np.abs(source[top:top + 24, left:left + 40] - seen).max() <= 1
            lefts.add(left)
            flips.add(bool(was_flipped))
    assert len(lefts) > 1 and flips == {False, True}
