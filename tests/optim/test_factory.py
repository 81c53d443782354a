"""build_optimizer: every name, group options, LoRA+ rates, clear errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from difflora.optim import OPTIMIZER_NAMES, ScaledAdamW, ScaledSGD, build_optimizer


def _named():
    return [("m.lora_A.default.weight", torch.nn.Parameter(torch.randn(2, 6))),
            ("m.lora_B.default.weight", torch.nn.Parameter(torch.randn(4, 2))),
            ("frozen.weight", torch.nn.Parameter(torch.randn(3), requires_grad=False)),
            ("emb.weight", torch.nn.Parameter(torch.randn(3, 3)))]


@pytest.mark.parametrize("name,cls", [("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD),
                                      ("scaled_adamw", ScaledAdamW), ("scaled_sgd", ScaledSGD)])
def test_plain_and_scaled_names(name, cls):
    opt = build_optimizer(name, _named(), lr=1e-3, weight_decay=1e-2, reg=None, betas=None)
    assert isinstance(opt, cls)
    assert sum(len(g["params"]) for g in opt.param_groups) == 3


def test_trainer_call_with_groups():
    unet, te = _named()[:2], _named()[3:]
    opt = build_optimizer("scaled_adamw", [{"params": unet, "lr": 1e-4}, {"params": te, "lr": 5e-6}],
                          lr=1e-4, weight_decay=1e-2, betas=[0.9, 0.999], eps=1e-8, reg=None)
    assert [g["lr"] for g in opt.param_groups] == [1e-4, 5e-6]
    assert opt.param_groups[0]["betas"] == (0.9, 0.999)


def test_loraplus_scales_b_factors_by_name():
    opt = build_optimizer("loraplus", [{"params": _named(), "lr": 1e-4}], lr=1e-3)
    lrs = sorted(g["lr"] for g in opt.param_groups)
    assert lrs == [1e-4, 1e-4 * 16]
    opt = build_optimizer("loraplus", _named(), lr=1e-3, loraplus_lr_ratio=4)
    b_group = max(opt.param_groups, key=lambda g: g["lr"])
    assert b_group["lr"] == 4e-3 and [p.shape for p in b_group["params"]] == [torch.Size([4, 2])]


def test_peft_riemannian_needs_model():
    with pytest.raises(ValueError, match="needs the model"):
        build_optimizer("peft_riemannian", _named(), lr=1e-3)
    from peft import LoraConfig, get_peft_model

    base = torch.nn.Sequential(torch.nn.Linear(6, 6))
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["0"]))
    opt = build_optimizer("peft_riemannian", model.named_parameters(), model=model, lr=1e-3, reg=1e-2)
    assert isinstance(opt, torch.optim.Optimizer)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes installed")
def test_adamw8bit_without_bitsandbytes_is_a_clear_error():
    with pytest.raises(ValueError, match="needs bitsandbytes"):
        build_optimizer("adamw8bit", _named(), lr=1e-3)


def test_unknown_name_and_option():
    with pytest.raises(ValueError, match="valid names: " + ", ".join(OPTIMIZER_NAMES)):
        build_optimizer("lion", _named())
    with pytest.raises(ValueError, match="does not take momentum"):
        build_optimizer("scaled_adamw", _named(), momentum=0.9)
    assert set(OPTIMIZER_NAMES) == {"adamw", "scaled_adamw", "sgd", "scaled_sgd", "loraplus",
                                    "peft_riemannian", "adamw8bit"}
