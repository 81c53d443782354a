"""The data options on the tiny model: each test fails if its option is parsed but ignored.

A spy records what the trainer really does: the micro-batches it draws, the prompts the text
encoder receives, the pixels the VAE encodes, SDXL's time ids, and the loss mask.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from difflora.config import parse_config
from difflora.families.sdxl import StableDiffusionXL
from difflora.train import checkpoint as ckpt
from difflora.train import engine
from difflora.train.dreambooth import DreamBoothConfig, train

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "concepts" / "checkered_star"
PROMPT = "a photo of sks star"
BUCKET_FLAGS = ("--bucket", "--min_bucket_reso", "16", "--max_bucket_reso", "64", "--bucket_reso_steps", "8")
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
           "white": (255, 255, 255)}


@dataclass
class Spy:
    batches: list[list[engine.Example]] = field(default_factory=list)  # every micro-batch drawn
    prompts: list[str] = field(default_factory=list)  # every prompt the first text encoder encoded
    pixels: list[torch.Tensor] = field(default_factory=list)  # every image the VAE encoded
    time_ids: list[torch.Tensor] = field(default_factory=list)
    losses: list[dict] = field(default_factory=list)  # pred, target, mask and loss of each forward
    summary: dict = field(default_factory=dict)


def _normalise(text: str) -> str:
    return re.sub(r"\s*,\s*", ", ", " ".join(text.split()))


def spied_train(argv: list[str]) -> Spy:
    spy = Spy()
    real_load, real_loss, real_micro = engine.load_base_model, engine.diffusion_loss, engine.Trainer.micro_batch

    def load(*args, **kwargs):
        base = real_load(*args, **kwargs)
        tokenizer = base.tokenizers[0]

        def on_text(module, args, kwargs):
            ids = args[0] if args else kwargs["input_ids"]
            spy.prompts.extend(_normalise(t) for t in tokenizer.batch_decode(ids, skip_special_tokens=True))

        base.text_encoders[0].register_forward_pre_hook(on_text, with_kwargs=True)
        base.vae.encoder.register_forward_pre_hook(lambda m, a: spy.pixels.extend(a[0].detach().cpu()))
        return base

    def loss(pred, target, timesteps, scheduler, snr_gamma=None, mask=None):
        out = real_loss(pred, target, timesteps, scheduler, snr_gamma, mask=mask)
        spy.losses.append({"pred": pred.detach().float().cpu(), "target": target.detach().float().cpu(),
                           "mask": None if mask is None else mask.detach().cpu(), "loss": out.detach().cpu()})
        return out

    def micro_batch(self, images, first_k):
        examples, ks = real_micro(self, images, first_k)
        spy.batches.append(examples)
        return examples, ks

    real_kwargs = StableDiffusionXL.unet_kwargs

    def unet_kwargs(self, *args, **kwargs):
        out = real_kwargs(self, *args, **kwargs)
        spy.time_ids.append(out["added_cond_kwargs"]["time_ids"].detach().cpu())
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(StableDiffusionXL, "unet_kwargs", unet_kwargs)
        mp.setattr(engine, "load_base_model", load)
        mp.setattr(engine, "diffusion_loss", loss)
        mp.setattr(engine.Trainer, "micro_batch", micro_batch)
        spy.summary = train(parse_config(DreamBoothConfig, argv))
    return spy


def _argv(model: Path, data: Path | None, out: Path, *extra: str, steps: int | None = 3, batch: int = 2) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), *(["--instance_data_dir", str(data)] if data else []),
            "--instance_prompt", PROMPT, "--resolution", "32", "--train_batch_size", str(batch),
            *(["--max_train_steps", str(steps)] if steps else ["--num_train_epochs", "1"]),
            "--checkpointing_steps", "100", "--num_validation_images", "0", "--learning_rate", "1e-2",
            "--output_dir", str(out), *extra]


def _colour(pixels: torch.Tensor) -> str:
    """The name of the solid colour of a (3, H, W) tensor in [-1, 1]."""
    rgb = ((pixels.float().mean(dim=(1, 2)) + 1) * 127.5).round().tolist()
    return min(COLOURS, key=lambda c: sum((a - b) ** 2 for a, b in zip(COLOURS[c], rgb)))


# ---- buckets ------------------------------------------------------------------------------------


@pytest.fixture
def mixed(tmp_path) -> Path:
    """Wide, tall and square solid images; red is both wide and tall (same bytes after cropping)."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name, size, colour in (("w-red", (96, 48), "red"), ("w-green", (90, 50), "green"),
                               ("t-red", (48, 96), "red"), ("t-blue", (44, 80), "blue"),
                               ("s-yellow", (40, 40), "yellow")):
        Image.new("RGB", size, COLOURS[colour]).save(folder / f"{name}.png")
    return folder


def test_buckets_train_in_their_shapes_and_never_mix(tiny_sd, mixed, tmp_path):
    """Every micro-batch is one bucket; wide, tall and square images train at their buckets' sizes
    (with cached latents: the wide and the tall red crop hold the same bytes, not the same latent)."""
    spy = spied_train(_argv(tiny_sd, mixed, tmp_path / "out", *BUCKET_FLAGS, "--cache_latents", steps=6))
    assert spy.summary["steps"] == 6
    expect = {(24, 40), (40, 24), (32, 32)}  # (h, w): 40x24 wide, 24x40 tall, the 32 square
    shapes = set()
    for batch in spy.batches:
        sizes = {e.target_size for e in batch}
        assert len(sizes) == 1, f"a micro-batch mixed buckets: {sizes}"
        shapes |= sizes
        (h, w), = sizes
        for e in batch:
            oh, ow = e.original_size
            assert (ow > oh) == (w > h) and (ow < oh) == (w < h)  # each image in its own bucket
    assert shapes == expect
    assert {tuple(p.shape[1:]) for p in spy.pixels} == expect
    assert len(spy.pixels) == 5  # one encode per image: the cache is keyed by content and shape


def test_bucketed_training_resumes_bit_identically(tiny_sd, mixed, tmp_path, monkeypatch):
    flags = (*BUCKET_FLAGS, "--random_flip", "--checkpointing_steps", "2")
    train(parse_config(DreamBoothConfig, _argv(tiny_sd, mixed, tmp_path / "whole", *flags, steps=5)))
    real = ckpt.save_checkpoint

    def save_then_die(output_dir, at_step, *args, **kwargs):
        path = real(output_dir, at_step, *args, **kwargs)
        if at_step == 2:
            raise KeyboardInterrupt
        return path

    with monkeypatch.context() as m:
        m.setattr(ckpt, "save_checkpoint", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            train(parse_config(DreamBoothConfig, _argv(tiny_sd, mixed, tmp_path / "cut", *flags, steps=5)))
    summary = train(parse_config(DreamBoothConfig, _argv(tiny_sd, mixed, tmp_path / "cut", *flags,
                                                         "--resume_from_checkpoint", "latest", steps=5)))
    assert summary["steps"] == 5
    a = load_file(tmp_path / "whole" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "cut" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sdxl_time_ids_follow_each_examples_bucket_and_crop(tiny_sdxl, mixed, tmp_path):
    spy = spied_train(_argv(tiny_sdxl, mixed, tmp_path / "xl", *BUCKET_FLAGS, "--random_flip", steps=4))
    assert len(spy.time_ids) == len(spy.batches) == 4
    targets = set()
    for ids, batch in zip(spy.time_ids, spy.batches):
        want = torch.tensor([[*e.original_size, *e.crop_top_left, *e.target_size] for e in batch], dtype=ids.dtype)
        assert torch.equal(ids, want)
        targets |= {tuple(r[4:].int().tolist()) for r in ids}
    assert targets - {(32, 32)}, "the target size must be the bucket's, not the training square"
    assert any(tuple(r[2:4].tolist()) != (0.0, 0.0) for ids in spy.time_ids for r in ids)  # real crops


# ---- captions -----------------------------------------------------------------------------------


@pytest.fixture
def tagged(tmp_path) -> Path:
    folder = tmp_path / "tagged"
    shutil.copytree(ASSETS, folder)
    for i, p in enumerate(sorted(folder.glob("*.txt"))):
        p.unlink()
        (folder / f"{i}.caption").write_text(f"sks star, red, blue, green, {['circle', 'square', 'ring'][i % 3]}")
    return folder


def test_caption_dropout_and_tag_shuffle_reach_the_text_encoder(tiny_sd, tagged, tmp_path):
    """--caption_extension reads the .caption files; dropped captions arrive as ''; shuffled ones
    keep their first tag (keep_tokens 1) and move the others."""
    spy = spied_train(_argv(tiny_sd, tagged, tmp_path / "caps", "--caption_extension", ".caption",
                            "--caption_dropout_rate", "0.3", "--shuffle_caption", "--keep_tokens", "1", steps=8))
    captions = {p.read_text() for p in tagged.glob("*.caption")}
    prompts = set(spy.prompts)
    assert "" in prompts  # dropped
    kept = prompts - {""}
    assert kept and all(p.startswith("sks star, ") for p in kept)
    assert all(any(sorted(p.split(", ")) == sorted(c.split(", ")) for c in captions) for p in kept)
    assert kept - captions, "no caption was shuffled"
    drawn = [e.prompt for b in spy.batches for e in b]
    assert 0 < drawn.count("") < len(drawn)


def test_caption_options_reach_ed_lora_through_the_same_loader(tagged, tmp_path):
    from difflora.mix_of_show.edlora import EDLoRAConfig, EDLoRAJob

    for p in tagged.glob("*.caption"):
        p.write_text("ohwx, " + p.read_text())
    cfg = parse_config(EDLoRAConfig, [
        "--pretrained_model_name_or_path", "unused", "--instance_data_dir", str(tagged), "--concept_words", "<c1>",
        "--initializer", "star", "--caption_placeholder", "ohwx", "--instance_prompt", "a photo of ohwx",
        "--resolution", "32", "--caption_extension", ".caption", "--caption_dropout_rate", "1",
        "--repeats", "3", *BUCKET_FLAGS, "--output_dir", str(tmp_path / "e")])
    (stream,) = EDLoRAJob(cfg).load_data()
    images = stream.images
    assert len(images) == 15 and images.buckets is not None
    assert all(p.startswith("<c1>, sks star") for p in images.prompts)
    assert {images.draw(k, 2).prompt for k in range(6)} == {""}


# ---- repeats ------------------------------------------------------------------------------------


def test_repeats_and_repeat_folders_lengthen_the_epoch(tiny_sd, tmp_path):
    one = spied_train(_argv(tiny_sd, ASSETS, tmp_path / "one", steps=None, batch=5))
    three = spied_train(_argv(tiny_sd, ASSETS, tmp_path / "three", "--repeats", "3", steps=None, batch=5))
    assert one.summary["steps"] == 1 and three.summary["steps"] == 3
    # kohya's layout: a '2_sks star' folder repeats its images twice, captioned 'sks star'.
    root = tmp_path / "kohya"
    shutil.copytree(ASSETS, root / "2_sks star", ignore=shutil.ignore_patterns("*.txt", "*.json"))
    spy = spied_train(_argv(tiny_sd, root, tmp_path / "two", steps=None, batch=5))
    assert spy.summary["steps"] == 2
    assert set(spy.prompts) == {"sks star"}


# ---- --dataset_name -----------------------------------------------------------------------------


def test_dataset_name_images_and_captions_are_trained_on(tiny_sd, tmp_path):
    pytest.importorskip("datasets")
    root = tmp_path / "ds"
    root.mkdir()
    rows = {"red": "a red square", "green": "a green circle", "blue": "a blue star"}
    with open(root / "metadata.jsonl", "w") as f:
        for colour, text in rows.items():
            Image.new("RGB", (40, 40), COLOURS[colour]).save(root / f"{colour}.png")
            f.write(json.dumps({"file_name": f"{colour}.png", "caption": text}) + "\n")
    argv = _argv(tiny_sd, None, tmp_path / "out", "--dataset_name", str(root), "--caption_column", "caption",
                 "--cache_dir", str(tmp_path / "cache"), steps=2, batch=3)
    spy = spied_train(argv)
    assert set(spy.prompts) == set(rows.values())
    seen = {(_colour(e.pixel_values), e.prompt) for b in spy.batches for e in b}
    assert seen == {(c, t) for c, t in rows.items()}  # each image with its own caption
    assert {_colour(p) for p in spy.pixels} == set(rows)


# ---- masks --------------------------------------------------------------------------------------


def test_mask_dir_weights_the_dreambooth_loss(tiny_sd, tmp_path):
    """Masks black except the left half: the loss of each example is its error over the left half
    only (a loss over the whole image, or a mask that does not follow the image, fails)."""
    masks = tmp_path / "masks"
    masks.mkdir()
    for p in ASSETS.glob("*.png"):
        m = np.zeros((64, 64), np.uint8)
        m[:, :32] = 255
        Image.fromarray(m).save(masks / p.name)
    spy = spied_train(_argv(tiny_sd, ASSETS, tmp_path / "masked", "--mask_dir", str(masks), "--center_crop",
                            steps=2))
    plain = spied_train(_argv(tiny_sd, ASSETS, tmp_path / "plain", "--center_crop", steps=1))
    first = spy.losses[0]
    mask = first["mask"]
    assert mask is not None and mask.shape[-2:] == first["pred"].shape[-2:]
    half = mask.shape[-1] // 2  # the cells either side of the edge are partly covered (resampling)
    assert torch.all(mask[..., :half - 1] == 1) and torch.all(mask[..., half + 1:] == 0)
    err = (first["pred"] - first["target"]) ** 2
    weights = mask.expand_as(err)
    torch.testing.assert_close(first["loss"], (err * weights).flatten(1).sum(1) / weights.flatten(1).sum(1))
    # Step 1 of both runs has the same weights, noise and timesteps: only the mask differs.
    torch.testing.assert_close(plain.losses[0]["pred"], first["pred"])
    assert not torch.allclose(plain.losses[0]["loss"], first["loss"])


# ---- all together ---------------------------------------------------------------------------------


def test_mixed_photos_with_every_feature_resume_bit_identically_and_load_in_diffusers(
        tiny_sd, mixed, tmp_path, monkeypatch, interrupted_after):
    """Landscape, portrait and square images in buckets, captions shuffled and dropped, EMA and
    DoRA on: an interrupted run resumed from its checkpoint ends with the uninterrupted run's raw
    and EMA files bit for bit, and stock diffusers loads both and is changed by them."""
    from diffusers import StableDiffusionPipeline

    for i, image in enumerate(sorted(mixed.glob("*.png"))):
        image.with_suffix(".txt").write_text(f"sks star, {image.stem}, tag{i}, solid")
    flags = (*BUCKET_FLAGS, "--random_flip", "--captions", "--shuffle_caption", "--keep_tokens", "1",
             "--caption_dropout_rate", "0.3", "--use_ema", "--ema_decay", "0.5", "--use_dora",
             "--checkpointing_steps", "2")
    train(parse_config(DreamBoothConfig, _argv(tiny_sd, mixed, tmp_path / "whole", *flags, steps=5)))
    with monkeypatch.context() as m:
        interrupted_after(m, 2)
        with pytest.raises(KeyboardInterrupt):
            train(parse_config(DreamBoothConfig, _argv(tiny_sd, mixed, tmp_path / "cut", *flags, steps=5)))
    train(parse_config(DreamBoothConfig, _argv(tiny_sd, mixed, tmp_path / "cut", *flags,
                                               "--resume_from_checkpoint", "latest", steps=5)))
    for sub in (".", "ema"):
        a = load_file(tmp_path / "whole" / sub / "pytorch_lora_weights.safetensors")
        b = load_file(tmp_path / "cut" / sub / "pytorch_lora_weights.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
        assert any("magnitude" in k for k in a), sub  # DoRA's magnitudes are in the file

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=g)
    hidden = torch.randn(1, 8, pipe.unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        base = pipe.unet(sample, 10, hidden).sample
        for sub in (".", "ema"):
            pipe.load_lora_weights(str(tmp_path / "whole" / sub), adapter_name=f"a{len(sub)}")
            pipe.set_adapters([f"a{len(sub)}"])
            assert not torch.allclose(pipe.unet(sample, 10, hidden).sample, base, atol=1e-6), sub
