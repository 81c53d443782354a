"""Trackers get the grids, the scores and the preconditioner's condition numbers; missing packages
and failed pushes end with one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from difflora.config import parse_config
from difflora.errors import EXIT_PUSH_FAILED, PushFailed, UserError
from difflora.optim.diagnostics import gram_condition_numbers
from difflora.tracking import check_optional_packages, push_to_hub
from difflora.train.dreambooth_config import DreamBoothConfig


def test_condition_numbers_of_known_grams():
    a = torch.diag(torch.tensor([1.0, 2.0]))  # A A^T = diag(1, 4): cond 4
    b = torch.diag(torch.tensor([3.0, 1.0]))  # B^T B = diag(9, 1): cond 9
    stats = gram_condition_numbers([("m.lora_A.weight", a), ("m.lora_B.weight", b)])
    assert stats["cond_AAt_median"] == pytest.approx(4.0) and stats["cond_BtB_max"] == pytest.approx(9.0)
    zero = gram_condition_numbers([("m.lora_A.weight", a), ("m.lora_B.weight", torch.zeros(2, 2))])
    assert zero["cond_BtB_max"] == float("inf")  # B = 0 at the start: singular, reported as inf
    assert gram_condition_numbers([("bias", torch.ones(3))]) == {}


def test_missing_tracker_or_optimizer_package_is_one_line(monkeypatch, tmp_path):
    import difflora.tracking as tracking

    monkeypatch.setattr(tracking, "_installed", lambda module: module not in ("wandb", "prodigyopt"))
    base = ["--pretrained_model_name_or_path", "m", "--instance_data_dir", str(tmp_path), "--instance_prompt", "x"]
    with pytest.raises(UserError, match="pip install wandb"):
        parse_config(DreamBoothConfig, [*base, "--report_to", "wandb"])
    with pytest.raises(UserError, match="pip install prodigyopt"):
        parse_config(DreamBoothConfig, [*base, "--optimizer", "prodigy"])
    cfg = parse_config(DreamBoothConfig, [*base, "--optimizer", "AdamW", "--report_to", "mlflow"])
    assert cfg.optimizer == "adamw"
    check_optional_packages(cfg)


def test_failed_push_keeps_files_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    with pytest.raises(PushFailed) as err:
        push_to_hub(tmp_path, "someone/some-lora")
    assert err.value.exit_code == EXIT_PUSH_FAILED == 3
    assert "someone/some-lora" in str(err.value) and "\n" not in str(err.value)
    assert (tmp_path / "pytorch_lora_weights.safetensors").read_bytes() == b"x"


def test_tensorboard_gets_grid_image_scores_and_condition_numbers(tiny_sd, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from difflora.train.dreambooth import train

    concept = Path(__file__).resolve().parents[1] / "assets" / "concepts" / "checkered_star"
    train(parse_config(DreamBoothConfig, [
        "--pretrained_model_name_or_path", str(tiny_sd), "--instance_data_dir", str(concept),
        "--instance_prompt", "a sks star", "--resolution", "32", "--train_batch_size", "2", "--max_train_steps", "2",
        "--num_validation_images", "1", "--validation_inference_steps", "2", "--clip_model", str(tiny_sd / "clip"),
        "--report_to", "tensorboard", "--output_dir", str(tmp_path / "tb")]))
    tags: dict[str, set[str]] = {"images": set(), "scalars": set()}
    for log in (tmp_path / "tb" / "logs").rglob("events.out.tfevents.*"):
        events = EventAccumulator(str(log), size_guidance={"images": 0, "scalars": 0})
        events.Reload()
        for kind in tags:
            tags[kind] |= set(events.Tags()[kind])
    assert "validation" in tags["images"]
    assert {"loss", "preconditioner/cond_BtB_median", "preconditioner/cond_BtB_max",
            "preconditioner/cond_AAt_median", "preconditioner/cond_AAt_max"} <= tags["scalars"]
    assert any(t.startswith("scores/after/clip_t") for t in tags["scalars"]), tags["scalars"]
