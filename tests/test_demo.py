"""The README's main command, shortened: trains the shipped concept and writes what it promises."""

import json

from difflora.cli import main as cli_main


def test_demo_writes_grid_loss_metrics(tmp_path, capsys):
    out = tmp_path / "demo"
    cli_main(["demo", "--output_dir", str(out), "--max_train_steps", "4"])
    for name in ("grid.png", "loss.png", "metrics.json", "pytorch_lora_weights.safetensors", "README.md"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["before"]) == {"clip_t", "clip_i"} and set(metrics["after"]) == {"clip_t", "clip_i"}
    assert "trained 'checkered_star' for 4 steps" in capsys.readouterr().out
    (out / "notes.txt").write_text("mine")
    cli_main(["demo", "--output_dir", str(out), "--max_train_steps", "2"])  # a rerun replaces the demo's outputs
    assert "trained 'checkered_star' for 2 steps" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2
    assert (out / "notes.txt").read_text() == "mine"  # files that are not the demo's are kept
