"""Two CPU processes (gloo DDP through accelerate) give the weights of one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]


def test_two_processes_match_one(db_args, tmp_path):
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    two = db_args("two", "--train_batch_size", "1", "--max_train_steps", "3", "--learning_rate", "1e-2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train_dreambooth.py"), *two]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("done:") == 1  # only the main process reports

    one = db_args("one", "--train_batch_size", "2", "--max_train_steps", "3", "--learning_rate", "1e-2")
    proc = subprocess.run([sys.executable, str(ROOT / "train_dreambooth.py"), *one], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]

    a = load_file(tmp_path / "two" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "one" / "pytorch_lora_weights.safetensors")
    moved = max(b[k].abs().max().item() for k in b if "lora_B" in k)
    assert moved > 1e-2
    # Same examples, noise and timesteps in both: only float reduction order differs.
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 2e-3
