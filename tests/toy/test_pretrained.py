"""The shipped toy CLIP (assets/toy-clip): loads with stock classes and judges the toy world.

Retrieval bounds below were measured on the shipped model (see
benchmarks/results/toy_pretrain.md) and asserted with a margin; chance is 1/60.
"""

from __future__ import annotations

import math
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import CLIPModel, CLIPProcessor, CLIPTokenizer

from difflora.errors import UserError
from difflora.evaluation import score_images
from difflora.toy import ToyWorld
from difflora.toy.pretrain import (
    ClipPretrainConfig,
    Tokens,
    caption_variants,
    contrastive_loss,
    main,
    pretrain_clip,
    retrieval_accuracy,
    retrieval_prompts,
    shape_variants,
    single_object_set,
)

ROOT = Path(__file__).resolve().parents[2]
TOY_CLIP = ROOT / "assets" / "toy-clip"

# Measured on the shipped model with 1200 fresh scenes per split (world seed 12345); the test
# uses 180 scenes of another seed, so the bounds leave room for sampling noise.
MIN_HELD_OUT_TOP1 = 0.9  # measured 0.978
MIN_TRAIN_TOP1 = 0.95  # measured 0.999


@pytest.fixture(scope="module")
def toy_clip():
    return CLIPModel.from_pretrained(TOY_CLIP).eval(), CLIPProcessor.from_pretrained(TOY_CLIP)


def test_shipped_folder_loads_with_stock_classes(toy_clip):
    model, processor = toy_clip
    files = {p.name for p in TOY_CLIP.iterdir()}
    assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    assert sum(p.stat().st_size for p in TOY_CLIP.iterdir()) <= 10_000_000
    vc, tc = model.config.vision_config, model.config.text_config
    assert (vc.image_size, vc.patch_size, vc.hidden_size) == (32, 4, 64)
    assert (tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads, tc.max_position_embeddings) == (64, 2, 4, 77)
    assert model.config.projection_dim == 64
    # The processor turns a 32 px world image into exactly the [-1, 1] pixels used in training.
    image, _ = ToyWorld(seed=7, size=32).sample(0)
    pixels = processor(images=[image], return_tensors="pt")["pixel_values"][0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(pixels, np.asarray(image, dtype=np.float32) / 127.5 - 1, atol=1e-5)
    # Colour and shape words are single tokens of the toy vocabulary.
    ids = processor.tokenizer("a red circle")["input_ids"]
    assert len(ids) == 5


@pytest.mark.parametrize("split,bound", [("held_out", MIN_HELD_OUT_TOP1), ("train", MIN_TRAIN_TOP1)])
def test_ranks_the_right_colour_and_shape_first(toy_clip, split, bound):
    model, _ = toy_clip
    images, labels = single_object_set(seed=777, split=split, n=180)
    acc = retrieval_accuracy(model, Tokens(CLIPTokenizer.from_pretrained(TOY_CLIP)), images, labels)
    assert acc["n"] == 180
    assert acc["top1"] >= bound, acc
    assert acc["top1"] > 10 / 60  # ten times chance


def test_clip_t_prefers_each_scenes_own_caption():
    """CLIP-T through difflora's scorer: matched captions beat the same captions shuffled."""
    world = ToyWorld(seed=99, size=32, split="train", relation_prob=0.0)
    images, captions = zip(*(world.sample(i) for i in range(24)))
    shuffled = list(captions[1:]) + [captions[0]]
    own = score_images(list(images), list(captions), None, clip_model=str(TOY_CLIP))["clip_t"]
    other = score_images(list(images), shuffled, None, clip_model=str(TOY_CLIP))["clip_t"]
    assert own > other + 0.05, (own, other)


def test_caption_variants_are_true_shorter_descriptions():
    world = ToyWorld(seed=0, size=32, relation_prob=0.0)
    scene = world.scene(0)
    obj = scene.objects[0]
    variants = caption_variants(scene)
    assert variants[0] == scene.caption
    art = "an" if obj.colour[0] in "aeiou" else "a"
    assert f"{art} {obj.colour} {obj.shape}" in variants
    assert f"{art} {obj.colour} {obj.shape} on a {scene.background} background" in variants
    assert shape_variants(scene) == [f"a {obj.shape}", f"a {obj.size} {obj.shape}"]
    assert variants[-2:] == shape_variants(scene)  # shape-only captions are true descriptions too
    two = ToyWorld(seed=0, size=32, relation_prob=1.0).scene(0)
    assert caption_variants(two) == [two.caption] and shape_variants(two) == []
    prompts, pairs = retrieval_prompts()
    assert len(prompts) == len(pairs) == 60 and "an orange star" in prompts


def test_contrastive_loss_matches_hand_computation():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    scale = torch.tensor(0.0)  # logits = cosines
    loss = contrastive_loss(img, txt, torch.eye(2, dtype=torch.bool), scale)
    # image rows: [1, 0.6] target 0, [0, 0.8] target 1; text rows: [1, 0] target 0, [0.6, 0.8] target 1
    def ce(a, b):
        return -a + math.log(math.exp(a) + math.exp(b))
    want = (ce(1, 0.6) + ce(0.8, 0) + ce(1, 0) + ce(0.8, 0.6)) / 4
    assert float(loss) == pytest.approx(want, rel=1e-6)
    # Two positives in a row share the target mass equally.
    both = contrastive_loss(img, txt, torch.tensor([[True, True], [False, True]]), scale)
    row0 = 0.5 * (ce(1, 0.6) + ce(0.6, 1))
    text0 = ce(1, 0)
    text1 = 0.5 * (ce(0.6, 0.8) + ce(0.8, 0.6))
    assert float(both) == pytest.approx((row0 + ce(0.8, 0)) / 4 + (text0 + text1) / 4, rel=1e-6)


def test_short_pretraining_lowers_the_loss_and_saves_a_loadable_model(tmp_path):
    cfg = ClipPretrainConfig(out=str(tmp_path / "clip"), hidden=32, vision_layers=1, text_layers=1,
                             projection_dim=32, patch_size=8, pool_size=64, relation_prob=0.0, batch_size=32,
                             lr=3e-3, warmup_steps=2, max_steps=40, eval_every=10, eval_images=30, seed=3)
    summary = pretrain_clip(cfg, progress=False)
    hist = summary["history"]
    assert summary["steps"] == 40 and len(hist) == 4
    # A model that knows nothing scores log(32) = 3.47 at most; measured 3.39 -> 3.13 over these 40
    # steps (shape-only captions are positives for several images at once, which raises the floor).
    assert hist[-1]["loss"] < hist[0]["loss"] - 0.15
    assert hist[-1]["loss"] < math.log(32) - 0.25
    model = CLIPModel.from_pretrained(tmp_path / "clip")
    assert model.config.vision_config.patch_size == 8
    assert (tmp_path / "clip" / "pretrain_summary.json").is_file()
    assert not (tmp_path / "clip.tmp").exists() and not (tmp_path / "clip.staging").exists()


def test_bad_settings_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="patch_size"):
        main(["--out", str(tmp_path / "x"), "--patch-size", "5"])
    with pytest.raises(UserError, match="recolour_prob"):
        main(["--out", str(tmp_path / "x"), "--recolour-prob", "1.5"])
    assert not (tmp_path / "x").exists()


def test_script_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["pretrain_toy.py", "clip", "--batch-size", "1", "--out", str(tmp_path / "y")])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "scripts" / "pretrain_toy.py"), run_name="__main__")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "batch_size" in err
    assert not (tmp_path / "y").exists()
