"""--use_dora: peft's DoRA layers; the scaled optimizers precondition only lora_A / lora_B and give
the magnitude vector the plain rule; a trained DoRA file loads in stock diffusers."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline
from torch import nn

from difflora.config import parse_config
from difflora.models import add_lora
from difflora.optim import build_optimizer
from difflora.train.dreambooth import DreamBoothConfig, train

MAGNITUDE = "lora_magnitude_vector"


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.to_q = nn.Linear(6, 5)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        return self.to_q(x).sum() + self.conv1(img).sum()


def _dora_block() -> nn.Module:
    torch.manual_seed(0)
    block = _Block().requires_grad_(False)
    assert add_lora(block, rank=2, alpha=2.0, targets=["to_q", "conv1"], use_dora=True) == 2
    return block


@pytest.mark.parametrize("name,plain", [("scaled_adamw", torch.optim.AdamW), ("scaled_sgd", torch.optim.SGD)])
def test_magnitude_is_unpaired_and_gets_the_plain_rule(name, plain):
    block = _dora_block()
    named = [(n, p) for n, p in block.named_parameters() if p.requires_grad]
    magnitudes = [n for n, _ in named if MAGNITUDE in n]
    assert len(magnitudes) == 2  # add_lora turned DoRA on: one magnitude per wrapped layer
    opts = {"lr": 1e-2, "weight_decay": 1e-2} | ({"momentum": 0.9} if name == "scaled_sgd" else {})
    opt = build_optimizer(name, named, reg=1e-3, **opts)
    paired = {n for p in opt._pairing() for n in (p.name_a, p.name_b)}
    assert paired == {n for n, _ in named if ".lora_A." in n or ".lora_B." in n}
    assert not paired & set(magnitudes)

    params = dict(named)
    with torch.no_grad():  # B != 0 so the preconditioner is not the plain rule either
        for n, p in params.items():
            if ".lora_B." in n:
                p.normal_()
    ref = {n: params[n].detach().clone().requires_grad_() for n in params}
    ref_opt = plain([ref[n] for n in magnitudes] + [ref[n] for n in params if ".lora_A." in n], **opts)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        for n, p in params.items():
            p.grad = torch.randn(p.shape, generator=g)
            ref[n].grad = p.grad.clone()
        opt.step()
        ref_opt.step()
    for n in magnitudes:
        torch.testing.assert_close(params[n], ref[n], rtol=0, atol=1e-7, msg=n)
    a = next(n for n in params if ".lora_A." in n)
    assert not torch.allclose(params[a], ref[a], atol=1e-4)  # the A factor was preconditioned


def test_dreambooth_dora_trains_the_magnitude_and_stock_diffusers_reproduces_it(db_args, tiny_sd, tmp_path, unet_out):
    seen: dict = {}

    def record(step, trainer):
        if step == 0:
            seen["start"] = {n: p.detach().clone() for n, p in trainer.trainable.items() if MAGNITUDE in n}
        seen["trainer"] = trainer

    train(parse_config(DreamBoothConfig, db_args("out", "--max_train_steps", "3", "--learning_rate", "1e-2",
                                                  "--use_dora", "--num_validation_images", "0")), [record])
    trainer = seen["trainer"]
    assert seen["start"], "no DoRA magnitude was trained"
    moved = max((trainer.trainable[n] - v).abs().max().item() for n, v in seen["start"].items())
    assert moved > 1e-4  # the magnitudes trained (plain AdamW on them)
    unet = trainer.unwrapped()[0].eval()
    trained = unet_out(unet)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    before = unet_out(pipe.unet)
    assert (trained - before).abs().max() > 1e-4
    pipe.load_lora_weights(tmp_path / "out")  # stock diffusers, default file name (magnitudes included)
    torch.testing.assert_close(unet_out(pipe.unet), trained, rtol=1e-5, atol=1e-5)
