"""benchmarks/vs_diffusers.py without diffusers' script: arguments, log parsing, the table, a run
with stand-in scripts for both sides."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("vs_diffusers", ROOT / "benchmarks" / "vs_diffusers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["vs_diffusers"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


# A stand-in training script: prints a progress line with a loss and writes the LoRA file.
FAKE = """import sys, pathlib
args = sys.argv[1:]
out = pathlib.Path(args[args.index("--output_dir") + 1])
out.mkdir(parents=True, exist_ok=True)
if "--train_text_encoder" in args and "{who}" == "peer":
    sys.exit("ValueError: the peer cannot train the text encoder here")
(out / "pytorch_lora_weights.safetensors").write_bytes(b"x")
print("{line}", file=sys.stderr)
"""


def _script(tmp_path: Path, who: str, line: str) -> Path:
    path = tmp_path / f"{who}.py"
    path.write_text(FAKE.format(who=who, line=line))
    return path


def test_arguments_are_checked(bench, tmp_path):
    peer = _script(tmp_path, "peer", "loss=1")
    with pytest.raises(SystemExit):
        bench.parse_args(["--peer", str(tmp_path / "missing.py")])
    with pytest.raises(SystemExit):
        bench.parse_args(["--peer", str(peer), "--repeats", "0"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--peer", str(peer), "--modes", "te-off,bogus"])
    args = bench.parse_args(["--peer", str(peer), "--modes", "te-on, te-off"])
    assert args.modes == ["te-on", "te-off"] and args.steps == 120 and args.batch == 2


def test_both_scripts_get_the_same_flags(bench, tmp_path):
    flags = bench.common_args(tmp_path / "m", tmp_path / "d", 120, 2, 32, 0)
    value = dict(zip(flags[::2], flags[1::2]))
    assert value["--max_train_steps"] == "120" and value["--train_batch_size"] == "2"
    assert value["--num_validation_images"] == "0" and int(value["--checkpointing_steps"]) > 120
    assert value["--lr_warmup_steps"] == "0"  # diffusers' default is 500


def test_final_loss_of_either_log(bench):
    ours = "dreambooth: 100%|#| 4/4 [loss=1.2000]\ndone: 4 steps, final loss 1.0836, wrote out\n"
    peer = "Steps:  50%|#| 2/4 [loss=1.3]\rSteps: 100%|#| 4/4 [00:00<00:00, loss=1.14, lr=0.0001]\n"
    assert bench.final_loss(ours) == (1.0836, "done: 4 steps, final loss 1.0836, wrote out")
    assert bench.final_loss(peer)[0] == 1.14 and "4/4" in bench.final_loss(peer)[1]
    assert bench.final_loss("Traceback\nValueError: x\n") == (None, "ValueError: x")


def test_run_with_stand_in_scripts_writes_the_table(bench, tmp_path):
    ours = _script(tmp_path, "ours", "done: 1 steps, final loss 0.5000, wrote x")
    peer = _script(tmp_path, "peer", "Steps: 100%|#| 1/1 [loss=0.6, lr=0.0001]")
    out = tmp_path / "result.md"
    bench.main(["--peer", str(peer), "--ours", str(ours), "--model", str(tmp_path), "--repeats", "2", "--warmup",
                "0", "--steps", "1", "--modes", "te-off,te-on", "--peer-shim", "off", "--out", str(out)])
    text = out.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| te-off |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "2" and float(cells[6]) > 0 and cells[8:] == ["0.5000", "0.6000"]
    failed = next(line for line in text.splitlines() if line.startswith("| te-on |"))
    assert "failed (peer)" in failed and "cannot train the text encoder" in failed
    assert "load average" in text and "before" in text and "after" in text
    assert "torch" in text and "sha256" in text
