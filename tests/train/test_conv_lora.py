"""--lora_targets all-linear+conv (LoCon): LoRA on the UNet's 3x3 convolutions too, trained with the
preconditioner on the flattened conv factors, saved in a file stock diffusers loads exactly."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from difflora.config import parse_config
from difflora.errors import UserError
from difflora.models import LORA_TARGET_PRESETS
from difflora.train.dreambooth import DreamBoothConfig, train

CONVS = (".resnets.0.conv1.", ".resnets.0.conv2.", ".downsamplers.0.conv.", ".upsamplers.0.conv.")


def test_preset_adds_the_3x3_convs_and_not_conv_in_out():
    linear, conv = LORA_TARGET_PRESETS["all-linear"], LORA_TARGET_PRESETS["all-linear+conv"]
    assert set(conv["unet"]) - set(linear["unet"]) == {"conv1", "conv2", "conv"}
    assert conv["text_encoder"] == linear["text_encoder"]
    assert not {"conv_in", "conv_out"} & set(conv["unet"])


def test_conv_lora_trains_preconditioned_and_stock_diffusers_reproduces_it(db_args, tiny_sd, tmp_path, unet_out):
    seen: dict = {}

    def record(step, trainer):
        if step == 0:
            seen["start"] = {n: p.detach().clone() for n, p in trainer.trainable.items()}
        seen["trainer"] = trainer

    train(parse_config(DreamBoothConfig, db_args("out", "--max_train_steps", "3", "--learning_rate", "1e-2",
                                                  "--lora_targets", "all-linear+conv",
                                                  "--num_validation_images", "0")), [record])
    trainer, start = seen["trainer"], seen["start"]
    conv = {n: p for n, p in trainer.trainable.items() if any(c in n for c in CONVS)}
    assert all(any(c in n for n in conv) for c in CONVS)  # ResNet conv1 / conv2, down- and upsamplers
    for n, p in conv.items():
        kernel = (3, 3) if ".lora_A." in n else (1, 1)
        assert p.dim() == 4 and tuple(p.shape[2:]) == kernel, n
        assert (p - start[n]).abs().max() > 0, f"{n} did not train"
    assert not any("conv_in" in n or "conv_out" in n for n in trainer.trainable)

    # The optimizer paired every conv factor (preconditioned, not the plain rule).
    paired = {n for pair in trainer.optimizer.optimizer._pairing() for n in (pair.name_a, pair.name_b)}
    assert set(conv) <= paired

    saved = load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    key = "unet.down_blocks.0.resnets.0.conv1.lora_A.weight"
    assert saved[key].dim() == 4 and torch.equal(saved[key], trainer.trainable[key.replace(".weight", ".default.weight")])

    unet = trainer.unwrapped()[0].eval()
    trained = unet_out(unet)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    before = unet_out(pipe.unet)
    assert (trained - before).abs().max() > 1e-4
    pipe.load_lora_weights(tmp_path / "out")  # stock diffusers, default file name
    torch.testing.assert_close(unet_out(pipe.unet), trained, rtol=1e-5, atol=1e-5)


def test_unknown_target_preset_is_refused(db_args):
    with pytest.raises((UserError, SystemExit)):
        parse_config(DreamBoothConfig, db_args("bad", "--lora_targets", "all-conv"))
