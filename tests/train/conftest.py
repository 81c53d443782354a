from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "concepts"


@pytest.fixture
def concept_dir(tmp_path) -> Path:
    """A writable copy of a shipped concept set."""
    dst = tmp_path / "concept"
    shutil.copytree(ASSETS / "checkered_star", dst)
    return dst


@pytest.fixture
def db_args(tiny_sd, concept_dir, tmp_path):
    """Command-line flags of a fast DreamBooth run on the tiny model."""

    def make(out: str = "out", *extra: str) -> list[str]:
        return [
            "--pretrained_model_name_or_path", str(tiny_sd), "--instance_data_dir", str(concept_dir),
            "--instance_prompt", "a photo of sks star", "--resolution", "32", "--train_batch_size", "2",
            "--max_train_steps", "4", "--checkpointing_steps", "100", "--num_validation_images", "1",
            "--validation_inference_steps", "2", "--output_dir", str(tmp_path / out),
            # stated, not diffusers' defaults (5e-4, 500 warm-up steps, tensorboard, grids every 50 epochs)
            "--learning_rate", "1e-4", "--lr_warmup_steps", "0", "--report_to", "none", "--validation_epochs", "none",
            *extra,
        ]

    return make


@pytest.fixture
def interrupted_after():
    """``interrupted_after(monkeypatch, step)``: the next run stops like a killed process right
    after it wrote checkpoint-``step``."""
    from difflora.train import checkpoint as ckpt

    def install(monkeypatch, step: int) -> None:
        real = ckpt.save_checkpoint

        def save_then_die(output_dir, at_step, *args, **kwargs):
            path = real(output_dir, at_step, *args, **kwargs)
            if at_step == step:
                raise KeyboardInterrupt
            return path

        monkeypatch.setattr(ckpt, "save_checkpoint", save_then_die)

    return install


@pytest.fixture
def unet_out():
    """``unet_out(unet)``: the UNet's output on one fixed random input (to compare two UNets)."""
    import torch

    @torch.no_grad()
    def out(unet):
        g = torch.Generator().manual_seed(0)
        sample = torch.randn(2, unet.config.in_channels, 8, 8, generator=g)
        hidden = torch.randn(2, 8, unet.config.cross_attention_dim, generator=g)
        return unet(sample, 10, hidden).sample

    return out
