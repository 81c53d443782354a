"""ED-LoRA on the shared engine: DDP on two CPU processes, bf16 mixed precision, bit-exact resume,
latent cache. Each test fails if ED-LoRA ran its own loop without the feature."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from difflora.cli import main as cli_main
from difflora.mix_of_show import edlora

ROOT = Path(__file__).resolve().parents[2]
ROBOT = ROOT / "assets" / "concepts" / "robot"


def _args(base, out: Path, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(base), "--instance_data_dir", str(ROBOT),
            "--concept_words", "<r1>+<r2>", "--initializer", "rand+robot", "--caption_placeholder", "ohwx",
            "--instance_prompt", "a photo of ohwx", "--resolution", "32", "--max_train_steps", "3",
            "--num_validation_images", "0", "--embedding_lr", "1e-2", "--text_encoder_lr", "1e-3",
            "--unet_lr", "1e-2", "--embedding_freeze_norm", "0", "--output_dir", str(out), *extra]


def _file(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / edlora.EDLORA_FILE)


def test_two_processes_match_one(tiny_sd, tmp_path, child_error):
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "mix_of_show" / "train_edlora.py"), *_args(tiny_sd, tmp_path / "two", "--train_batch_size", "1")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, child_error(proc.stderr)
    assert proc.stdout.count("done:") == 1  # only the main process reports
    proc = subprocess.run([sys.executable, str(ROOT / "mix_of_show" / "train_edlora.py"),
                           *_args(tiny_sd, tmp_path / "one", "--train_batch_size", "2")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = _file(tmp_path / "two"), _file(tmp_path / "one")
    assert max(b[k].abs().max().item() for k in b if "lora_B" in k) > 1e-3  # it trained
    # Same examples, noise and timesteps in both (the global batch is split): only reduction order differs.
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 2e-3


def test_bf16_trains_saves_fp32_and_resumes_bit_exactly(tiny_sd, tmp_path, capsys):
    common = ["--mixed_precision", "bf16", "--checkpointing_steps", "1", "--cache_latents"]
    cli_main(["edlora", *_args(tiny_sd, tmp_path / "full", *common)])
    full = _file(tmp_path / "full")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in full.values())
    # The frozen UNet really ran in bf16 (so the run is not fp32 in disguise).
    plain = tmp_path / "fp32"
    cli_main(["edlora", *_args(tiny_sd, plain, "--checkpointing_steps", "1", "--cache_latents")])
    assert any(not torch.equal(full[k], v) for k, v in _file(plain).items())
    # Resume the bf16 run from step 1 into a new folder: the same file, bit for bit.
    cli_main(["edlora", *_args(tiny_sd, tmp_path / "resumed", *common, "--resume_from_checkpoint",
                               str(tmp_path / "full" / "checkpoint-1"))])
    resumed = _file(tmp_path / "resumed")
    assert resumed.keys() == full.keys()
    assert all(torch.equal(resumed[k], full[k]) for k in full)
