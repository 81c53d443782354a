"""--dataset_name through the datasets library, offline: a local imagefolder with a metadata.jsonl."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from difflora.data.hf_datasets import load_dataset_images
from difflora.errors import UserError

pytest.importorskip("datasets")

ROWS = {"red.png": ("red", "a red sks square"), "green.png": ("green", "a green sks square"),
        "blue.png": ("blue", "")}


@pytest.fixture
def imagefolder(tmp_path):
    root = tmp_path / "ds"
    (root / "train").mkdir(parents=True)
    with open(root / "train" / "metadata.jsonl", "w") as f:
        for name, (colour, text) in ROWS.items():
            Image.new("RGB", (24, 16), colour).save(root / "train" / name)
            f.write(json.dumps({"file_name": name, "text": text}) + "\n")
    return root


def test_local_imagefolder_images_and_captions(imagefolder, tmp_path):
    found = load_dataset_images(str(imagefolder), None, "image", "text", "fallback", repeats=2,
                                cache_dir=str(tmp_path / "cache"))
    by_name = {p.name: (im, d) for p, im, d in zip(found.paths, found.images, found.defaults)}
    assert set(by_name) == set(ROWS)
    for name, (colour, text) in ROWS.items():
        image, caption = by_name[name]
        assert image.size == (24, 16)
        assert np.array_equal(np.asarray(image)[0, 0], np.asarray(Image.new("RGB", (1, 1), colour))[0, 0])
        assert caption == (text or "fallback")  # an empty caption falls back to the prompt
    assert found.repeats == [2, 2, 2] and sorted(found.keys) == ["blue", "green", "red"]
    # Without a caption column every image gets the prompt.
    plain = load_dataset_images(str(imagefolder), None, "image", None, "p", cache_dir=str(tmp_path / "cache"))
    assert plain.defaults == ["p"] * 3


def test_wrong_columns_are_one_line(imagefolder, tmp_path):
    cache = str(tmp_path / "cache")
    with pytest.raises(UserError, match="--image_column 'img' is not a column.*image, text"):
        load_dataset_images(str(imagefolder), None, "img", None, "p", cache_dir=cache)
    with pytest.raises(UserError, match="--caption_column 'caption' is not a column"):
        load_dataset_images(str(imagefolder), None, "image", "caption", "p", cache_dir=cache)
    with pytest.raises(UserError, match="not images"):
        load_dataset_images(str(imagefolder), None, "text", None, "p", cache_dir=cache)


def test_missing_dataset_is_one_line(tmp_path):
    with pytest.raises(UserError, match="cannot load dataset"):
        load_dataset_images(str(tmp_path / "nope"), None, "image", None, "p", cache_dir=str(tmp_path / "cache"))
