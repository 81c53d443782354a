"""The toy world: seeded, its captions say what is drawn, held-out pairs stay out of training."""

from __future__ import annotations

import numpy as np
import pytest

from difflora.toy import (
    HELD_OUT,
    SHAPES,
    ToyDataset,
    ToyWorld,
    colour_fractions,
    colour_shape_prompts,
    render,
)
from difflora.toy.world import COLOURS


def test_same_seed_same_images_other_seed_other_images():
    a, b, c = ToyWorld(seed=3), ToyWorld(seed=3), ToyWorld(seed=4)
    for i in range(6):
        (ia, ca), (ib, cb) = a.sample(i), b.sample(i)
        assert ca == cb and np.array_equal(np.asarray(ia), np.asarray(ib))
    assert [a.scene(i).caption for i in range(6)] != [c.scene(i).caption for i in range(6)]


@pytest.mark.parametrize("split", ["train", "held_out"])
def test_captions_match_pixels(split):
    world = ToyWorld(seed=1, split=split, relation_prob=0.5)
    for i in range(30):
        scene = world.scene(i)
        image, masks = render(scene, 64, return_masks=True)
        caption = scene.caption
        assert caption.endswith(f"on a {scene.background} background")
        everywhere = colour_fractions(image)
        assert everywhere[scene.background] > 0.45, caption  # the named background dominates
        for obj, mask in zip(scene.objects, masks):
            assert f"{obj.colour} {obj.shape}" in caption
            assert mask.sum() > 20, caption
            inside = colour_fractions(image, mask)
            assert inside[obj.colour] > 0.9, (caption, obj.colour, inside)
            centre = int(obj.cy * 64), int(obj.cx * 64)
            assert mask[centre] == (obj.shape != "ring"), caption  # rings have a hole
        if scene.relation:
            ys, xs = [np.nonzero(m) for m in masks][0], [np.nonzero(m) for m in masks][1]
            (y0, x0), (y1, x1) = (ys[0].mean(), ys[1].mean()), (xs[0].mean(), xs[1].mean())
            expected = {"left of": x0 < x1, "right of": x0 > x1, "above": y0 < y1, "below": y0 > y1}
            assert expected[scene.relation], caption
            assert f" {scene.relation} " in caption


def test_held_out_pairs_never_in_training_split():
    held = set(HELD_OUT)
    seen = set()
    for i in range(400):
        for obj in ToyWorld(seed=0, split="train", relation_prob=0.5).scene(i).objects:
            assert (obj.colour, obj.shape) not in held
            seen.add((obj.colour, obj.shape))
    # ... while every colour and shape of the held-out pairs is still trained on.
    assert {c for c, _ in held} <= {c for c, _ in seen} and {s for _, s in held} <= {s for _, s in seen}
    for i in range(50):
        objs = ToyWorld(seed=0, split="held_out").scene(i).objects
        assert (objs[0].colour, objs[0].shape) in held
    assert len(colour_shape_prompts(held_out_only=True)) == len(HELD_OUT)
    assert len(colour_shape_prompts()) == (len(COLOURS) - 1) * len(SHAPES)  # no white on white


def test_any_size_and_dataset_items():
    image, caption = ToyWorld(size=40).sample(0)
    assert image.size == (40, 40)
    ds = ToyDataset(ToyWorld(seed=2, size=32), n=5)
    item = ds[4]
    assert len(ds) == 5 and item["pixel_values"].shape == (3, 32, 32)
    assert -1.0 <= float(item["pixel_values"].min()) and float(item["pixel_values"].max()) <= 1.0
    assert item["caption"] == ToyWorld(seed=2, size=32).scene(4).caption
    with pytest.raises(IndexError):
        ds[5]
