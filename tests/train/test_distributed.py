"""Two CPU processes (gloo DDP through accelerate) give the weights of one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]


def test_two_processes_match_one(db_args, tmp_path, child_error):
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    two = db_args("two", "--train_batch_size", "1", "--max_train_steps", "3", "--learning_rate", "1e-2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train_dreambooth.py"), *two]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, child_error(proc.stderr)
    assert proc.stdout.count("done:") == 1  # only the main process reports

    one = db_args("one", "--train_batch_size", "2", "--max_train_steps", "3", "--learning_rate", "1e-2")
    proc = subprocess.run([sys.executable, str(ROOT / "train_dreambooth.py"), *one], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, child_error(proc.stderr)

    a = load_file(tmp_path / "two" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "one" / "pytorch_lora_weights.safetensors")
    moved = max(b[k].abs().max().item() for k in b if "lora_B" in k)
    assert moved > 1e-2
    # Same examples, noise and timesteps in both: only float reduction order differs.
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 2e-3


def test_sdxl_text_encoder_lora_trains_only_layers_that_reach_the_unet(tiny_sdxl, concept_dir, tmp_path, child_error):
    """SDXL reads the first encoder's penultimate layer: a LoRA after it would never get a gradient
    (and DDP refuses unused parameters), so it stays out of the optimizer; two processes run."""
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    args = ["--pretrained_model_name_or_path", str(tiny_sdxl), "--instance_data_dir", str(concept_dir),
            "--instance_prompt", "a photo of sks star", "--resolution", "32", "--train_batch_size", "1",
            "--max_train_steps", "2", "--num_validation_images", "0", "--train_text_encoder",
            "--checkpointing_steps", "1", "--output_dir", str(tmp_path / "xl")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train_dreambooth.py"), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, child_error(proc.stderr)
    trained = load_file(tmp_path / "xl" / "checkpoint-1" / "weights.safetensors")

    def layers(prefix: str) -> set[int]:
        return {int(k.split(".layers.")[1].split(".")[0]) for k in trained if k.startswith(prefix) and ".layers." in k}

    n1, n2 = (json.loads((tiny_sdxl / sub / "config.json").read_text())["num_hidden_layers"]
              for sub in ("text_encoder", "text_encoder_2"))
    assert layers("text_encoder_0.") == set(range(n1 - 1))  # the first encoder's last layer is not trained
    assert layers("text_encoder_1.") == set(range(n2))
