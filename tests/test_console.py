"""The console: fast --help, difflora's own summary shown, the libraries' chatter hidden."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets" / "concepts" / "checkered_star"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_VERBOSITY")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


def test_dreambooth_help_imports_no_torch():
    code = ("import sys\nfrom difflora.cli import main\ntry:\n    main(['dreambooth', '--help'])\n"
            "except SystemExit as e:\n    assert e.code == 0\n"
            "print('HEAVY', [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd=ROOT,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--pretrained_model_name_or_path" in out.stdout and "--verbose" in out.stdout
    assert "HEAVY []" in out.stdout, out.stdout.splitlines()[-1]


def test_train_dreambooth_script_help_imports_no_torch():
    """The thin recipe script answers --help from the same light options class (-X importtime lists
    every module imported, so a torch import anywhere on the way shows)."""
    out = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "train_dreambooth.py"), "--help"],
                         capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--pretrained_model_name_or_path" in out.stdout
    imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert "difflora.config" in imported  # the importtime listing is there
    assert not imported & {"torch", "diffusers", "transformers"}, sorted(imported & {"torch", "diffusers"})


def test_plain_run_shows_summary_and_no_library_warnings(tiny_sd, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "difflora", "dreambooth", "--pretrained_model_name_or_path", str(tiny_sd),
           "--instance_data_dir", str(ASSETS), "--instance_prompt", "a sks star", "--resolution", "32",
           "--train_batch_size", "2", "--max_train_steps", "2", "--num_validation_images", "1",
           "--validation_inference_steps", "2", "--output_dir", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=300)
    text = run.stdout + run.stderr
    assert run.returncode == 0, text
    for needle in ("dreambooth: ", "data: 5 instance images", "trainable parameters:", "UNet",
                   "steps: 2", "effective batch 2", "precision: fp32", "optimizer: scaled_adamw",
                   f"output: {out}", "trackers: tensorboard"):
        assert needle in text, (needle, text)
    noisy = [line for line in text.splitlines() if "warn" in line.lower() or "Loading weights" in line]
    assert not noisy, noisy
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_verbose_is_accepted_by_every_job():
    from difflora.config import parse_config
    from difflora.demo import DemoConfig

    cfg = parse_config(DemoConfig, ["--verbose", "--max_train_steps", "3"])
    assert cfg.max_train_steps == 3
