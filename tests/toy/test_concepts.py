"""Shipped concept sets: present, tiny, captioned with their trigger and reproducible from the seed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from difflora.toy import colour_fractions
from difflora.toy.concepts import CONCEPTS, concept_images

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "concepts"


def test_shipped_sets_are_complete_and_small():
    total = 0
    for name, concept in CONCEPTS.items():
        pngs = sorted((ASSETS / name).glob("*.png"))
        assert 4 <= len(pngs) <= 6, name
        for png in pngs:
            assert Image.open(png).size == (64, 64)
            caption = png.with_suffix(".txt").read_text().strip()
            assert f"{concept.trigger} {concept.class_word}" in caption
            total += png.stat().st_size
        meta = json.loads((ASSETS / name / "concept.json").read_text())
        assert meta["trigger"] == concept.trigger and meta["new_context_prompts"]
    assert (ASSETS / "README.md").is_file()
    assert total < 200_000


def test_shipped_images_regenerate_from_the_seed():
    for name in CONCEPTS:
        for i, (image, caption) in enumerate(concept_images(name)):
            shipped = np.asarray(Image.open(ASSETS / name / f"{i}.png").convert("RGB"), dtype=int)
            assert np.abs(np.asarray(image, dtype=int) - shipped).max() <= 2, (name, i)
            assert (ASSETS / name / f"{i}.txt").read_text().strip() == caption


def test_concepts_show_their_parts():
    for image, _ in concept_images("checkered_star"):
        f = colour_fractions(image)
        assert f["orange"] > 0.03 and f["purple"] > 0.03  # both check colours, in similar amounts
        assert 0.4 < f["orange"] / f["purple"] < 2.5
    for image, _ in concept_images("robot"):
        f = colour_fractions(image)
        assert f["blue"] > 0.03 and f["yellow"] > 0.002 and f["red"] > 0.05
        arr = np.asarray(image)
        blue_rows = np.nonzero((np.abs(arr - (30, 60, 220)).sum(-1) < 60).any(1))[0]
        red_rows = np.nonzero((np.abs(arr - (220, 30, 30)).sum(-1) < 60).any(1))[0]
        assert blue_rows.mean() < red_rows.mean()  # the head sits above the body
