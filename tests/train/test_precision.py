"""Mixed precision end to end: fp16 / bf16 runs train, sample grids, save and resume like fp32 runs.

Frozen weights run in the low-precision dtype while LoRA factors are trained and saved in fp32; the
VAE stays fp32 and decodes whatever dtype the UNet hands it. On a CPU accelerate runs fp16 without
autocast or loss scaling; ``test_fp16_with_loss_scaling_resumes_identically`` runs the GPU path
(autocast + GradScaler) on the CPU so that it is covered without a GPU.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from difflora.cli import main as cli_main
from difflora.config import parse_config
from difflora.train import engine
from difflora.train.dreambooth import DreamBoothConfig, train

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def run(argv: list[str]) -> dict:
    return train(parse_config(DreamBoothConfig, argv))


@pytest.fixture
def loaded(monkeypatch) -> list:
    """The base models the trainer loads, kept for inspection after the run."""
    seen: list = []
    real = engine.load_base_model

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(engine, "load_base_model", spy)
    return seen


def _lora_is_fp32_finite_and_trained(weights: dict[str, torch.Tensor]) -> None:
    assert weights and all(v.dtype == torch.float32 for v in weights.values())
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert max(float(v.abs().max()) for k, v in weights.items() if "lora_B" in k or "lora_up" in k) > 0


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_trains_samples_saves_and_resumes(db_args, loaded, precision, tmp_path):
    argv = db_args("mp", "--mixed_precision", precision, "--max_train_steps", "3", "--checkpointing_steps", "2",
                   "--validation_steps", "2", "--validation_inference_steps", "1", "--learning_rate", "1e-2",
                   "--train_text_encoder")
    summary = run(argv)
    out = tmp_path / "mp"
    assert summary["steps"] == 3 and torch.isfinite(torch.tensor(summary["final_loss"]))
    # Grids at the start, at the intermediate validation step and at the end: the VAE decoded fp16/bf16 latents.
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-0.png", "step-2.png", "step-3.png"]
    base = loaded[0]
    assert base.unet.conv_in.weight.dtype == DTYPES[precision]  # frozen weights really ran in low precision
    assert base.text_encoders[0].get_input_embeddings().weight.dtype == DTYPES[precision]
    assert base.vae.decoder.conv_in.weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in base.unet.parameters() if p.requires_grad)
    final = load_file(out / "pytorch_lora_weights.safetensors")
    _lora_is_fp32_finite_and_trained(final)
    assert any(k.startswith("text_encoder.") for k in final)
    _lora_is_fp32_finite_and_trained(load_file(out / "checkpoint-2" / "weights.safetensors"))

    # Resume from the step-2 checkpoint: the same weights as the uninterrupted run, bit for bit on CPU.
    kept = tmp_path / "uninterrupted.safetensors"
    shutil.move(out / "pytorch_lora_weights.safetensors", kept)
    summary = run([*argv, "--resume_from_checkpoint", "checkpoint-2"])
    assert summary["steps"] == 3
    resumed = load_file(out / "pytorch_lora_weights.safetensors")
    expected = load_file(kept)
    assert resumed.keys() == expected.keys() and all(torch.equal(resumed[k], expected[k]) for k in expected)


@pytest.fixture
def gpu_like_fp16(monkeypatch) -> list:
    """Make accelerate treat the CPU like a GPU under fp16: autocast to fp16 and a GradScaler.

    The scaler doubles its scale after every step (growth_interval 1), so a resumed run that did not
    restore it would scale its losses differently from the uninterrupted run.
    """
    from accelerate import Accelerator

    made: list = []
    real_init = Accelerator.__init__

    def init(self, *args, **kwargs) -> None:
        real_init(self, *args, **kwargs)
        if self.state.mixed_precision == "fp16":
            self.native_amp = True
            self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=1)
            made.append(self)

    monkeypatch.setattr(Accelerator, "__init__", init)
    return made


def test_fp16_with_loss_scaling_resumes_identically(db_args, gpu_like_fp16, tmp_path):
    argv = db_args("gpu", "--mixed_precision", "fp16", "--max_train_steps", "3", "--checkpointing_steps", "2",
                   "--learning_rate", "1e-2", "--num_validation_images", "0")
    run(argv)
    out = tmp_path / "gpu"
    scaler = gpu_like_fp16[-1].scaler
    assert scaler.get_scale() == 2.0 ** 11  # three steps, none skipped: the scaled path really ran
    state = json.loads((out / "checkpoint-2" / "state.json").read_text())
    assert state["grad_scaler"]["scale"] == 2.0 ** 10
    final = load_file(out / "pytorch_lora_weights.safetensors")
    _lora_is_fp32_finite_and_trained(final)

    (out / "pytorch_lora_weights.safetensors").unlink()
    run([*argv, "--resume_from_checkpoint", "checkpoint-2"])
    assert gpu_like_fp16[-1].scaler.get_scale() == 2.0 ** 11  # continued from the saved scale
    resumed = load_file(out / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(resumed[k], final[k]) for k in final)


@pytest.mark.parametrize("variable", ["ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"])
def test_sharded_launch_is_one_line_before_any_work(db_args, variable, monkeypatch, capsys, tmp_path):
    """DeepSpeed is not installed here: the refusal must not depend on importing it."""
    monkeypatch.setenv(variable, "true")
    with pytest.raises(SystemExit) as exc:
        cli_main(["dreambooth", *db_args("ds")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert err[0].startswith("difflora dreambooth: error: DeepSpeed / FSDP") and "plain DDP" in err[0]
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_sample_pipeline_has_the_asked_dtype_even_where_diffusers_ignores_it(tiny_sd, dtype, monkeypatch):
    """diffusers < 0.42 ignores ``dtype=`` (it knows only ``torch_dtype``): the pipeline is cast anyway."""
    from diffusers import DiffusionPipeline

    from difflora.sampling import load_pipeline

    real = DiffusionPipeline.from_pretrained.__func__

    def old_diffusers(cls, *args, dtype=None, **kwargs):
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", classmethod(old_diffusers))
    pipe = load_pipeline(str(tiny_sd), dtype=dtype)
    want = getattr(torch, dtype)
    assert pipe.unet.dtype == want and pipe.vae.dtype == want and pipe.text_encoder.dtype == want
    image = pipe("a photo of sks star", num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3) and 0.0 < float(image.std())


def test_edlora_fp16_samples_saves_fp32_and_resumes(tiny_sd, concept_dir, tmp_path):
    """ED-LoRA's trained fp32 concept rows make fp32 prompt embeddings for an fp16 UNet: grids still work."""
    from difflora.mix_of_show.edlora import EDLoRAConfig
    from difflora.mix_of_show.edlora import train as train_edlora

    out = tmp_path / "ed"
    argv = ["--pretrained_model_name_or_path", str(tiny_sd), "--instance_data_dir", str(concept_dir),
            "--concept_words", "<s1>+<s2>", "--initializer", "rand+star", "--caption_placeholder", "sks",
            "--instance_prompt", "a photo of sks", "--resolution", "32", "--train_batch_size", "2",
            "--max_train_steps", "3", "--checkpointing_steps", "2", "--validation_steps", "2",
            "--num_validation_images", "1", "--validation_inference_steps", "1", "--mixed_precision", "fp16",
            "--output_dir", str(out)]
    train_edlora(parse_config(EDLoRAConfig, argv))
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-0.png", "step-2.png", "step-3.png"]
    final = load_file(out / "edlora.safetensors")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in final.values())
    assert "edlora_embeddings.<s1>" in final

    kept = tmp_path / "uninterrupted.safetensors"
    shutil.move(out / "edlora.safetensors", kept)
    train_edlora(parse_config(EDLoRAConfig, [*argv, "--resume_from_checkpoint", "checkpoint-2"]))
    resumed, expected = load_file(out / "edlora.safetensors"), load_file(kept)
    assert resumed.keys() == expected.keys() and all(torch.equal(resumed[k], expected[k]) for k in expected)
