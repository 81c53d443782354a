"""End-to-end DreamBooth runs on the tiny offline models."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file

from difflora.config import parse_config
from difflora.train.dreambooth import DreamBoothConfig, train


def run(argv: list[str]) -> dict:
    return train(parse_config(DreamBoothConfig, argv))


def _images(pipe, prompt="a photo of sks star"):
    return pipe(prompt, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images


def test_trains_saves_and_stock_pipeline_loads_it(db_args, tiny_sd, tmp_path):
    summary = run(db_args("out", "--output_kohya_format", "--learning_rate", "1e-2", "--clip_model",
                          str(tiny_sd / "clip")))
    out = tmp_path / "out"
    for name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors", "README.md",
                 "loss.png", "metrics.json", "samples/step-0.png", "samples/step-4.png"):
        assert (out / name).is_file(), name
    assert summary["steps"] == 4 and summary["final_loss"] > 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["after"]["clip_i"] <= 1 and "clip_t" in metrics["before"]
    assert "a photo of sks star" in (out / "README.md").read_text()

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    before = _images(pipe)
    pipe.load_lora_weights(out)
    after = _images(pipe)
    assert abs(after - before).max() > 1e-3  # the LoRA changes the pipeline's images

    kohya = StableDiffusionPipeline.from_pretrained(tiny_sd)
    kohya.load_lora_weights(out, weight_name="pytorch_lora_weights_kohya.safetensors")
    assert abs(_images(kohya) - after).max() < 1e-4  # both files hold the same LoRA
    keys = load_file(out / "pytorch_lora_weights_kohya.safetensors")
    assert any(k.endswith(".alpha") for k in keys)


@pytest.mark.parametrize("optimizer", ["adamw", "scaled_sgd", "loraplus"])
def test_other_optimizers_train(db_args, optimizer, tmp_path):
    summary = run(db_args(f"out-{optimizer}", "--optimizer", optimizer, "--learning_rate", "1e-3"))
    assert summary["steps"] == 4 and torch.isfinite(torch.tensor(summary["final_loss"]))
    weights = load_file(tmp_path / f"out-{optimizer}" / "pytorch_lora_weights.safetensors")
    ups = [v for k, v in weights.items() if "lora_B" in k]
    assert ups and all(torch.isfinite(v).all() for v in ups)
    assert max(float(v.abs().max()) for v in ups) > 0  # B starts at 0: the optimizer moved it


def test_same_seed_same_weights_and_resume_is_bit_identical(db_args, tmp_path):
    run(db_args("a", "--max_train_steps", "4", "--random_flip", "--learning_rate", "1e-2"))
    run(db_args("b", "--max_train_steps", "4", "--checkpointing_steps", "2", "--random_flip",
                "--learning_rate", "1e-2"))
    a = load_file(tmp_path / "a" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "b" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "b" / "checkpoint-2" / "state.json").is_file()
    # Continue b from its step-2 checkpoint: the final weights equal the uninterrupted run's.
    (tmp_path / "b" / "pytorch_lora_weights.safetensors").unlink()
    summary = run(db_args("b", "--max_train_steps", "4", "--checkpointing_steps", "2", "--random_flip",
                          "--learning_rate", "1e-2", "--resume_from_checkpoint", "checkpoint-2"))
    assert summary["steps"] == 4
    c = load_file(tmp_path / "b" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in a)
    lora_changed = max(a[k].abs().max().item() for k in a if "lora_B" in k)
    assert lora_changed > 0


def test_resume_latest_to_more_steps(db_args, tmp_path):
    run(db_args("r", "--max_train_steps", "3", "--checkpointing_steps", "2"))
    summary = run(db_args("r", "--max_train_steps", "5", "--checkpointing_steps", "2",
                          "--resume_from_checkpoint", "latest"))
    assert summary["steps"] == 5
    assert len(json.loads((tmp_path / "r" / "checkpoint-4" / "state.json").read_text())["losses"]) == 4


def test_checkpoint_limit_and_no_half_written_checkpoint(db_args, tmp_path):
    run(db_args("k", "--max_train_steps", "7", "--checkpointing_steps", "2", "--checkpoints_total_limit", "2"))
    names = sorted(p.name for p in (tmp_path / "k").iterdir() if p.name.startswith("checkpoint"))
    assert names == ["checkpoint-4", "checkpoint-6"]
    assert not [p for p in (tmp_path / "k").iterdir() if p.name.startswith(".checkpoint")]


def test_prior_preservation_generates_missing_class_images(db_args, tmp_path):
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    summary = run(db_args("p", "--with_prior_preservation", "--class_data_dir", str(class_dir),
                          "--class_prompt", "a photo of star", "--num_class_images", "3"))
    assert len(list(class_dir.glob("*.png"))) == 3
    assert summary["steps"] == 4
    before = sorted(p.stat().st_mtime for p in class_dir.glob("*.png"))
    run(db_args("p2", "--with_prior_preservation", "--class_data_dir", str(class_dir),
                "--class_prompt", "a photo of star", "--num_class_images", "3"))
    assert sorted(p.stat().st_mtime for p in class_dir.glob("*.png")) == before  # reused, not regenerated


def test_v_prediction_snr_noise_offset_captions(tiny_sd_v, concept_dir, tmp_path):
    summary = run([
        "--pretrained_model_name_or_path", str(tiny_sd_v), "--instance_data_dir", str(concept_dir),
        "--instance_prompt", "a photo of sks star", "--resolution", "32", "--train_batch_size", "2",
        "--max_train_steps", "3", "--snr_gamma", "5", "--noise_offset", "0.05", "--captions",
        "--train_text_encoder", "--text_encoder_lr", "1e-5", "--gradient_accumulation_steps", "2",
        "--lr_scheduler", "cosine", "--lr_warmup_steps", "1", "--cache_latents", "--lora_targets", "all-linear",
        "--num_validation_images", "1", "--validation_inference_steps", "2", "--output_dir", str(tmp_path / "v"),
    ])
    assert summary["steps"] == 3 and torch.isfinite(torch.tensor(summary["final_loss"]))
    keys = load_file(tmp_path / "v" / "pytorch_lora_weights.safetensors")
    assert any(k.startswith("text_encoder.") for k in keys)
    assert any("proj_in" in k for k in keys)  # all-linear preset reaches the transformer's projections


def test_sdxl_with_text_encoders(tiny_sdxl, concept_dir, tmp_path):
    out = tmp_path / "xl"
    run([
        "--pretrained_model_name_or_path", str(tiny_sdxl), "--instance_data_dir", str(concept_dir),
        "--instance_prompt", "a photo of sks star", "--resolution", "32", "--train_batch_size", "1",
        "--max_train_steps", "2", "--train_text_encoder", "--learning_rate", "1e-2",
        "--num_validation_images", "1", "--validation_inference_steps", "2", "--output_dir", str(out),
    ])
    keys = load_file(out / "pytorch_lora_weights.safetensors")
    assert any(k.startswith("text_encoder_2.") for k in keys)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    kw = dict(num_inference_steps=2, output_type="np", height=32, width=32)
    before = pipe("a photo of sks star", generator=torch.Generator().manual_seed(0), **kw).images
    pipe.load_lora_weights(out)
    after = pipe("a photo of sks star", generator=torch.Generator().manual_seed(0), **kw).images
    assert abs(after - before).max() > 1e-4
