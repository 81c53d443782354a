"""Each DreamBooth option changes what training does, measured against the same run without it.

A spy records what the trainer does inside: the prompts the text encoder receives, how many images
the VAE encodes, the learning rate of each optimizer step, the per-example losses. A test here
fails if its option is parsed but ignored.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from difflora.config import parse_config
from difflora.optim.preconditioner import DEFAULT_REG
from difflora.train import checkpoint as ckpt
from difflora.train import engine
from difflora.train.dreambooth import DreamBoothConfig, train
from difflora.train.loss import snr

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "concepts" / "checkered_star"
PROMPT = "a photo of sks star"
LR = 1e-2


@dataclass
class Spy:
    """What one training run did, step by step."""

    bases: list = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)  # every prompt the (first) text encoder encoded
    encoded_images: int = 0  # images through the VAE encoder
    lrs: list[float] = field(default_factory=list)  # learning rate of each optimizer step
    losses: list[torch.Tensor] = field(default_factory=list)  # per-example losses of each forward
    timesteps: list[torch.Tensor] = field(default_factory=list)
    snr_gammas: list[float | None] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)


def spied_train(argv: list[str]) -> Spy:
    """Run the trainer with spies on the base model, the optimizer and the loss."""
    spy = Spy()
    real_load, real_build, real_loss = engine.load_base_model, engine.build_optimizer, engine.diffusion_loss

    def load(*args, **kwargs):
        base = real_load(*args, **kwargs)
        tokenizer = base.tokenizers[0]

        def on_text(module, args, kwargs):
            ids = args[0] if args else kwargs["input_ids"]
            spy.prompts.extend(" ".join(t.split()) for t in tokenizer.batch_decode(ids, skip_special_tokens=True))

        def on_image(module, args):
            spy.encoded_images += args[0].shape[0]

        base.text_encoders[0].register_forward_pre_hook(on_text, with_kwargs=True)
        base.vae.encoder.register_forward_pre_hook(on_image)
        spy.bases.append(base)
        return base

    def build(*args, **kwargs):
        optimizer = real_build(*args, **kwargs)
        optimizer.register_step_pre_hook(lambda opt, a, k: spy.lrs.append(opt.param_groups[0]["lr"]))
        return optimizer

    def loss(pred, target, timesteps, scheduler, snr_gamma=None, *args, **kwargs):
        out = real_loss(pred, target, timesteps, scheduler, snr_gamma, *args, **kwargs)
        spy.losses.append(out.detach().clone())
        spy.timesteps.append(timesteps.detach().clone())
        spy.snr_gammas.append(snr_gamma)
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "load_base_model", load)
        mp.setattr(engine, "build_optimizer", build)
        mp.setattr(engine, "diffusion_loss", loss)
        spy.summary = train(parse_config(DreamBoothConfig, argv))
    spy.weights = load_file(Path(spy.summary["output_dir"]) / "pytorch_lora_weights.safetensors")
    return spy


@pytest.fixture(scope="module")
def make_argv(tiny_sd, tmp_path_factory):
    """Flags of a short run without sample grids; ``steps=None`` trains by epochs instead."""
    root = tmp_path_factory.mktemp("features")
    concept = root / "concept"
    shutil.copytree(ASSETS, concept)

    def make(name: str, *extra: str, steps: int | None = 3, batch: int = 2) -> list[str]:
        return ["--pretrained_model_name_or_path", str(tiny_sd), "--instance_data_dir", str(concept),
                "--instance_prompt", PROMPT, "--resolution", "32", "--train_batch_size", str(batch),
                *(["--max_train_steps", str(steps)] if steps else ["--num_train_epochs", "1"]),
                "--checkpointing_steps", "100", "--num_validation_images", "0", "--learning_rate", str(LR),
                "--output_dir", str(root / name), *extra]

    return make


@pytest.fixture(scope="module")
def baseline(make_argv) -> Spy:
    """Three steps of two images with every option off."""
    return spied_train(make_argv("baseline"))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _moved(w: dict[str, torch.Tensor]) -> float:
    return max(float(v.abs().max()) for k, v in w.items() if "lora_B" in k)


def test_baseline_is_what_the_others_compare_to(baseline):
    """Constant schedule, one encode per distinct image, only the instance prompt, unweighted loss."""
    assert baseline.summary["steps"] == 3
    assert baseline.lrs == [LR] * 3
    # 6 draws of 5 images whose pixels never change (no flips; 64 px squares resized to 32 px leave
    # the crop no freedom): each image's posterior is kept, so the VAE sees 5 images.
    assert baseline.encoded_images == 5
    assert set(baseline.prompts) == {PROMPT}
    assert set(baseline.snr_gammas) == {None}
    assert _moved(baseline.weights) > 0


def test_snr_gamma_weights_each_example_by_min_snr(make_argv, baseline):
    spy = spied_train(make_argv("snr", "--snr_gamma", "5"))
    assert set(spy.snr_gammas) == {5.0}
    # Step 1 starts from the same weights (B = 0), noise and timesteps: the per-example losses are
    # the unweighted ones times min(SNR, 5) / SNR.
    t = baseline.timesteps[0]
    assert torch.equal(spy.timesteps[0], t)
    s = snr(spy.bases[0].noise_scheduler, t)
    weight = torch.minimum(s, torch.full_like(s, 5.0)) / s
    torch.testing.assert_close(spy.losses[0], baseline.losses[0] * weight)
    assert float(weight.min()) < 0.99, "the test needs a low-noise timestep to mean anything"
    assert _max_diff(spy.weights, baseline.weights) > 1e-5


def test_noise_offset_changes_the_noise(make_argv, baseline):
    spy = spied_train(make_argv("offset", "--noise_offset", "0.1"))
    assert not torch.allclose(spy.losses[0], baseline.losses[0])  # same model at step 1: other noise
    assert _max_diff(spy.weights, baseline.weights) > 1e-5


def test_captions_reach_the_text_encoder(make_argv):
    spy = spied_train(make_argv("captions", "--captions"))
    captions = {p.read_text().strip() for p in ASSETS.glob("*.txt")}
    assert len(captions) == 5
    assert set(spy.prompts) == captions  # three steps of two draw all five images


def test_random_flips_encode_every_draw(make_argv):
    spy = spied_train(make_argv("flip", "--random_flip"))
    assert spy.encoded_images == 6  # flipped or not at random: no posterior is kept


def test_cache_latents_encodes_each_image_once(make_argv):
    spy = spied_train(make_argv("cache", "--cache_latents", steps=4))
    assert spy.summary["steps"] == 4
    assert spy.encoded_images == 5  # 8 images drawn, 5 distinct: the VAE is not used once they are cached


def test_gradient_accumulation_equals_the_larger_batch(make_argv, baseline):
    """Two micro-batches of one give the gradient of one batch of two (the same examples).

    Compared under SGD, whose update is linear in the gradient, so float noise is not amplified.
    """
    sgd = ("--optimizer", "sgd", "--learning_rate", "1")
    spy = spied_train(make_argv("accum", "--gradient_accumulation_steps", "2", *sgd, steps=None, batch=1))
    assert spy.summary["steps"] == 3  # an epoch of 5 images is ceil(5 / (1 x 2)) optimizer steps, not 5
    assert len(spy.lrs) == 3 and spy.encoded_images == 5  # 6 draws, 5 distinct images
    torch.testing.assert_close(torch.cat(spy.losses[:2]), baseline.losses[0])  # the same examples
    batch = spied_train(make_argv("batch", *sgd))
    assert _moved(batch.weights) > 1e-3
    assert _max_diff(spy.weights, batch.weights) < 1e-3 * _moved(batch.weights)


def test_cosine_schedule_with_warmup_sets_each_steps_lr(make_argv):
    spy = spied_train(make_argv("cosine", "--lr_scheduler", "cosine", "--lr_warmup_steps", "1", steps=3))
    # Warm-up step 0 -> 0; then half a cosine over the remaining 2 steps: cos^2(0), cos^2(pi/4).
    expected = [0.0, LR, LR * math.cos(math.pi / 4) ** 2]
    assert spy.lrs == pytest.approx(expected, abs=1e-12)


def test_gradient_checkpointing_is_on_and_changes_nothing_but_memory(make_argv, monkeypatch):
    calls = []
    real = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    plain = spied_train(make_argv("gc-off", "--train_text_encoder", steps=1))
    assert not calls
    spy = spied_train(make_argv("gc-on", "--train_text_encoder", "--gradient_checkpointing", steps=1))
    unet, text_encoder = spy.bases[0].unet, spy.bases[0].text_encoders[0]
    assert unet.is_gradient_checkpointing and text_encoder.is_gradient_checkpointing
    assert calls  # the checkpointed forward really ran
    assert any(k.startswith("text_encoder.") for k in spy.weights)
    assert _moved(spy.weights) > 1e-4
    assert _max_diff(spy.weights, plain.weights) < 1e-6


def test_peft_riemannian_preconditions_like_scaled_adamw(make_argv, baseline):
    """peft's optimizer applies the preconditioner of difflora's scaled_adamw (the baseline); AdamW differs."""
    peft = spied_train(make_argv("peft", "--optimizer", "peft_riemannian", "--optimizer_reg", str(DEFAULT_REG)))
    adamw = spied_train(make_argv("adamw", "--optimizer", "adamw"))
    moved = _moved(adamw.weights)
    assert _max_diff(peft.weights, baseline.weights) < 2e-2 * moved  # float noise only (measured 0.2%)
    assert _max_diff(peft.weights, adamw.weights) > 0.5 * moved  # measured 190%


def test_interrupted_checkpoint_save_is_never_used(make_argv, monkeypatch, capsys):
    """Ctrl-C while checkpoint-2 is being written: `latest` is still checkpoint-1 and resume starts there."""
    argv = make_argv("interrupted", "--checkpointing_steps", "1", steps=3)
    out = Path(argv[argv.index("--output_dir") + 1])
    real_save_file = ckpt.save_file

    def save_file(tensors, path, *args, **kwargs):
        real_save_file(tensors, path, *args, **kwargs)
        if "checkpoint-2" in str(path) and Path(path).name != "weights.safetensors":
            raise KeyboardInterrupt  # the weights and part of the optimizer state are on disk

    monkeypatch.setattr(ckpt, "save_file", save_file)
    with pytest.raises(KeyboardInterrupt):
        train(parse_config(DreamBoothConfig, argv))
    monkeypatch.undo()
    partial = [p for p in out.iterdir() if "checkpoint-2" in p.name]
    assert partial and all(p.name.startswith(".") for p in partial)  # the half-written folder is hidden
    assert any((p / "weights.safetensors").is_file() for p in partial)  # it really was half written
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-1"]
    assert ckpt.resolve_resume(out, "latest") == out / "checkpoint-1"

    capsys.readouterr()
    summary = train(parse_config(DreamBoothConfig, [*argv, "--resume_from_checkpoint", "latest"]))
    assert "checkpoint-1 at step 1" in capsys.readouterr().out
    assert summary["steps"] == 3
    assert json.loads((out / "checkpoint-2" / "state.json").read_text())["step"] == 2  # whole this time


@pytest.fixture(scope="module")
def logged_run(make_argv) -> Spy:
    """Four steps with a sample grid every epoch (3 steps) and TensorBoard logging."""
    return spied_train(make_argv("logged", "--num_validation_images", "1", "--validation_inference_steps", "1",
                                 "--validation_epochs", "1", "--report_to", "tensorboard", steps=4))


def test_validation_grids_at_start_every_epoch_and_end(logged_run):
    samples = Path(logged_run.summary["output_dir"]) / "samples"
    assert sorted(p.name for p in samples.iterdir()) == ["step-0.png", "step-3.png", "step-4.png"]
    first, last = (np.asarray(Image.open(samples / f"step-{s}.png").convert("RGB"), dtype=np.float64) for s in (0, 4))
    assert first.shape == last.shape and np.abs(first - last).max() > 0  # grids show the LoRA of their step


def test_tensorboard_logs_the_loss_of_every_step(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folders = {p.parent for p in (Path(logged_run.summary["output_dir"]) / "logs").rglob("events.out.tfevents.*")}
    scalars = [acc for acc in (EventAccumulator(str(f)).Reload() for f in sorted(folders))
               if "loss" in acc.Tags()["scalars"]]
    assert len(scalars) == 1, "one event file under output_dir/logs holds the loss"
    assert "lr" in scalars[0].Tags()["scalars"]
    logged = scalars[0].Scalars("loss")
    assert [e.step for e in logged] == [1, 2, 3, 4]
    expected = [float(per_example.mean()) for per_example in logged_run.losses]
    assert [e.value for e in logged] == pytest.approx(expected, rel=1e-5)
    assert logged[-1].value == pytest.approx(logged_run.summary["final_loss"], rel=1e-6)
