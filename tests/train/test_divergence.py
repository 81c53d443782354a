"""A diverging run stops at the first non-finite loss, gradient norm or weight: exit 2, one line
naming the step and the last good checkpoint, which holds finite weights; nothing non-finite is
ever written (no checkpoint, no LoRA)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from difflora.cli import main as cli_main
from difflora.errors import UserError
from difflora.train import engine
from difflora.train.dreambooth import DreamBoothConfig


def _stops(argv: list[str], capsys, expect: str) -> str:
    with pytest.raises(SystemExit) as exc:
        cli_main(["dreambooth", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err), err
    assert err[-1].startswith("difflora dreambooth: error:") and expect in err[-1], err[-1]
    return err[-1]


def _all_finite(out: Path) -> None:
    """Every weight difflora wrote into ``out`` is finite."""
    files = [*out.glob("checkpoint-*/weights.safetensors"), *out.glob("*.safetensors")]
    for f in files:
        assert all(torch.isfinite(v).all() for v in load_file(f).values()), f


def _named(message: str, out: Path) -> Path:
    """The checkpoint the error names as the last good one: it exists and holds finite weights."""
    name = re.search(r"last good checkpoint is (checkpoint-\d+)", message)
    assert name, message
    weights = load_file(out / name.group(1) / "weights.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())
    return out / name.group(1)


def _from_call(n: int, change):
    """Patch the trainer's loss so that from its n-th call on, ``change`` is applied to it."""
    real, calls = engine.diffusion_loss, [0]

    def patched(*args, **kwargs):
        calls[0] += 1
        loss = real(*args, **kwargs)
        return change(loss) if calls[0] >= n else loss

    return patched


class _InfiniteGradient(torch.autograd.Function):
    """Identity forward, infinite backward: a finite loss whose gradients overflow."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * math.inf


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_max_grad_norm_must_be_finite_and_not_negative(db_args, capsys, value):
    _stops(db_args() + ["--max_grad_norm", value], capsys, "max_grad_norm")


def test_validate_refuses_nan_max_grad_norm_of_a_config_built_in_code():
    cfg = DreamBoothConfig(pretrained_model_name_or_path="m", instance_data_dir="d", instance_prompt="a sks dog",
                           max_grad_norm=math.nan)
    with pytest.raises(UserError, match="--max_grad_norm must be a finite number"):
        cfg.validate()


def test_nan_loss_stops_and_names_a_finite_checkpoint(db_args, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "diffusion_loss", _from_call(3, lambda loss: loss * math.nan))
    last = _stops(db_args("n", "--max_train_steps", "6", "--checkpointing_steps", "2"), capsys,
                  "the loss became nan at step 3; the last good checkpoint is checkpoint-2")
    _named(last, tmp_path / "n")
    assert not (tmp_path / "n" / "pytorch_lora_weights.safetensors").exists()


@pytest.mark.parametrize("clip", ["1.0", "0"])
def test_infinite_gradient_stops_before_the_update(db_args, capsys, tmp_path, monkeypatch, clip):
    """With clipping on, an infinite norm would zero-scale the gradients into NaN; with it off they
    would go straight into the weights: either way the run stops at that step."""
    monkeypatch.setattr(engine, "diffusion_loss", _from_call(3, _InfiniteGradient.apply))
    last = _stops(db_args("g", "--max_train_steps", "6", "--checkpointing_steps", "2", "--max_grad_norm", clip),
                  capsys, "the gradient norm became")
    assert "at step 3; the last good checkpoint is checkpoint-2" in last
    _named(last, tmp_path / "g")
    _all_finite(tmp_path / "g")
    assert not (tmp_path / "g" / "pytorch_lora_weights.safetensors").exists()


def _poisoning_optimizer(at_call: int):
    """Patch the trainer's optimizer so that its ``at_call``-th step leaves an infinite weight
    (as an overflowing update would) while loss and gradients stay finite."""
    real = engine.build_optimizer

    def build(*args, **kwargs):
        opt, calls = real(*args, **kwargs), [0]

        def poison(optimizer, *_):
            calls[0] += 1
            if calls[0] >= at_call:
                with torch.no_grad():
                    optimizer.param_groups[0]["params"][-1].fill_(math.inf)

        opt.register_step_post_hook(poison)
        return opt

    return build


def test_weights_that_become_infinite_are_never_saved(db_args, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "build_optimizer", _poisoning_optimizer(2))
    last = _stops(db_args("w", "--max_train_steps", "4", "--checkpointing_steps", "1"), capsys,
                  "became NaN or infinite at step 2; the last good checkpoint is checkpoint-1")
    _named(last, tmp_path / "w")
    assert not (tmp_path / "w" / "checkpoint-2").exists()
    assert not (tmp_path / "w" / "pytorch_lora_weights.safetensors").exists()
    _all_finite(tmp_path / "w")


def test_huge_learning_rate_writes_only_finite_weights(db_args, capsys, tmp_path):
    """lr 1e6 may blow the weights up to huge finite values (fine) or on to NaN (stop): in both cases
    every file written is finite and a named last good checkpoint is finite."""
    argv = db_args("h", "--optimizer", "adamw", "--learning_rate", "1e6", "--max_train_steps", "5",
                   "--checkpointing_steps", "1")
    try:
        cli_main(["dreambooth", *argv])
    except SystemExit as exc:
        assert exc.code == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        if "last good checkpoint is checkpoint-" in last:
            _named(last, tmp_path / "h")
    _all_finite(tmp_path / "h")
