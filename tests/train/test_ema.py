"""--use_ema: an EMA of the trained weights, updated once per optimizer step, written to
output_dir/ema/, used for the sample grids, checkpointed and resumed bit for bit. Each test fails
if the option is parsed but ignored."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from difflora.config import parse_config
from difflora.errors import UserError
from difflora.mix_of_show import edlora
from difflora.train import validation
from difflora.train.dreambooth import DreamBoothConfig, train
from difflora.train.engine import EMA_DIR

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "concepts"
WEIGHTS = "pytorch_lora_weights.safetensors"


def run(argv: list[str], callbacks=None) -> dict:
    return train(parse_config(DreamBoothConfig, argv), callbacks)


def _file_key(name: str) -> str:
    """Trainer parameter name -> key in the diffusers file."""
    return name.replace(".default.weight", ".weight")


def _decay(k: int, ema_decay: float) -> float:
    """diffusers' EMAModel decay at its k-th update (no warm-up): min(ema_decay, (1+t)/(10+t)), t = k - 1."""
    t = k - 1
    return 0.0 if t <= 0 else min(ema_decay, (1 + t) / (10 + t))


def test_ema_is_the_average_of_the_raw_trajectory_and_samples_use_it(db_args, tmp_path, monkeypatch):
    """3 steps: the EMA file equals the EMA computed by hand from the raw weights after each step
    (with --ema_decay capping the third decay), differs from the raw file, and the final sample grid
    is drawn with the EMA weights in the UNet."""
    raw: list[dict[str, torch.Tensor]] = []

    def record(step, trainer):
        raw.append({n: p.detach().clone() for n, p in trainer.trainable.items()})

    sampled: list[dict[str, torch.Tensor]] = []

    def fake_grid(pipe, *args, **kwargs):
        sampled.append({n: p.detach().clone() for n, p in pipe.unet.named_parameters() if "lora_" in n})
        return None

    monkeypatch.setattr(validation, "sample_grid", fake_grid)
    ema_decay = 0.2  # below (1+2)/(10+2) = 0.25: the third update must use it
    run(db_args("out", "--max_train_steps", "3", "--learning_rate", "1e-2", "--use_ema",
                "--ema_decay", str(ema_decay)), [record])
    out = tmp_path / "out"
    assert len(raw) == 4  # before training, then after each of the 3 steps
    ema = {n: t.clone() for n, t in raw[0].items()}
    for k in (1, 2, 3):
        d = _decay(k, ema_decay)
        for n in ema:
            ema[n].sub_((1 - d) * (ema[n] - raw[k][n]))  # EMAModel.step's arithmetic
    saved_raw, saved_ema = load_file(out / WEIGHTS), load_file(out / EMA_DIR / WEIGHTS)
    assert set(saved_ema) == set(saved_raw) == {_file_key(n) for n in ema}
    for n, value in ema.items():
        assert torch.equal(saved_raw[_file_key(n)], raw[3][n]), n  # the main file keeps the raw weights
        torch.testing.assert_close(saved_ema[_file_key(n)], value, rtol=0, atol=1e-7, msg=n)
    moved = max((saved_ema[k] - saved_raw[k]).abs().max().item() for k in saved_raw)
    assert moved > 1e-4  # the EMA is not the raw weights
    # Grids: step 0 (EMA = raw), then the final one with the EMA weights in the model.
    assert len(sampled) == 2
    last = {_file_key(f"unet.{n}"): t for n, t in sampled[-1].items()}
    assert last.keys() == saved_ema.keys() and all(torch.equal(last[k], saved_ema[k]) for k in saved_ema)


def test_resume_gives_the_uninterrupted_ema_bit_for_bit(db_args, tmp_path, monkeypatch, interrupted_after):
    flags = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--learning_rate", "1e-2", "--use_ema",
             "--ema_decay", "0.5", "--num_validation_images", "0"]
    run(db_args("whole", *flags))
    with monkeypatch.context() as m:
        interrupted_after(m, 2)
        with pytest.raises(KeyboardInterrupt):
            run(db_args("cut", *flags))
    assert (tmp_path / "cut" / "checkpoint-2" / "ema.safetensors").is_file()
    run(db_args("cut", *flags, "--resume_from_checkpoint", "latest"))
    for name in (WEIGHTS, f"{EMA_DIR}/{WEIGHTS}"):
        a, b = load_file(tmp_path / "whole" / name), load_file(tmp_path / "cut" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # A run with EMA cannot continue a checkpoint written without it (its EMA would start mid-run).
    run(db_args("plain", "--max_train_steps", "3", "--checkpointing_steps", "2", "--num_validation_images", "0"))
    with pytest.raises(UserError, match="use_ema"):
        run(db_args("plain", "--max_train_steps", "4", "--checkpointing_steps", "2", "--num_validation_images",
                    "0", "--use_ema", "--resume_from_checkpoint", "checkpoint-2"))


def test_ema_decay_out_of_range_is_refused(db_args):
    with pytest.raises(UserError, match="ema_decay"):
        run(db_args("bad", "--use_ema", "--ema_decay", "1.5"))


def test_edlora_writes_its_ema_concept_file(tiny_sd, tmp_path):
    out = tmp_path / "concept"
    edlora.train(parse_config(edlora.EDLoRAConfig, [
        "--pretrained_model_name_or_path", str(tiny_sd), "--instance_data_dir", str(ASSETS / "robot"),
        "--concept_words", "<r1>", "--initializer", "robot", "--caption_placeholder", "ohwx",
        "--instance_prompt", "a photo of ohwx", "--resolution", "32", "--max_train_steps", "3",
        "--num_validation_images", "0", "--unet_lr", "1e-2", "--embedding_lr", "1e-2",
        "--embedding_freeze_norm", "0", "--use_ema", "--output_dir", str(out)]))
    raw, ema = load_file(out / edlora.EDLORA_FILE), load_file(out / EMA_DIR / edlora.EDLORA_FILE)
    assert raw.keys() == ema.keys()
    assert max((raw[k] - ema[k]).abs().max().item() for k in raw) > 1e-4
    assert edlora.load_edlora(out / EMA_DIR).metadata["ema"] is True
