"""`difflora sweep`: a 2 x 2 grid on the tiny model writes the CSV, plots and summary; a rerun trains
nothing (new eval settings re-score, new base settings are refused); the 90% band is computed by
hand; shipped sweep configs parse; bad input -> exit 2 before any run."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import yaml
from PIL import Image

import difflora.sweep as sweep_mod
from difflora.cli import main as cli
from difflora.config import parse_config
from difflora.sweep import SweepConfig, band_width_decades, eval_settings, prompt_templates

ROOT = Path(__file__).resolve().parents[1]
CONCEPT = ROOT / "assets" / "concepts" / "checkered_star"


def test_band_width_is_contiguous_around_the_best():
    lrs = [1e-4, 1e-3, 1e-2, 1e-1]
    assert band_width_decades(lrs, [0.5, 0.95, 1.0, 0.5]) == pytest.approx(1.0)
    # 1e-4 reaches 90% too but is cut off from the best by 1e-3: not part of the band
    assert band_width_decades(lrs, [0.95, 0.5, 1.0, 0.92]) == pytest.approx(1.0)
    assert band_width_decades(lrs, [0.9, 0.95, 1.0, 0.91]) == pytest.approx(3.0)
    assert band_width_decades(lrs, [0.1, 0.2, 1.0, 0.3]) == 0.0
    assert band_width_decades(lrs, [-0.1, -0.2, -0.05, -0.3]) is None  # no positive best
    assert band_width_decades(lrs[::-1], [0.5, 1.0, 0.95, 0.5]) == pytest.approx(1.0)  # order-free


def write_sweep(tmp_path: Path, tiny_sd: Path, **over) -> Path:
    data = {
        "optimizers": ["adamw", "scaled_adamw"],
        "learning_rates": [1e-3, 1e-1],
        "seeds": [0],
        "output_dir": str(tmp_path / "sweep"),
        "base": {
            "pretrained_model_name_or_path": str(tiny_sd), "instance_data_dir": str(CONCEPT),
            "instance_prompt": "a sks star", "resolution": 32, "train_batch_size": 1, "max_train_steps": 2,
            "checkpointing_steps": 100, "num_validation_images": 0,
        },
        "eval": {"prompts": ["a {} on a black background"], "concept": "sks star", "clip_concept": "star",
                 "clip_model": str(tiny_sd / "clip"), "dino_model": str(tiny_sd / "dino"),
                 "seeds": [0], "steps": 2},
    }
    for key, value in over.items():
        if isinstance(value, dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_two_by_two_sweep_writes_csv_plots_and_rerun_skips(tiny_sd, tmp_path, monkeypatch, capsys):
    calls = []
    real_train = sweep_mod._train

    def counting_train(cfg):
        calls.append((cfg.optimizer, cfg.learning_rate, cfg.seed, cfg.output_dir))
        return real_train(cfg)

    monkeypatch.setattr(sweep_mod, "_train", counting_train)
    config = write_sweep(tmp_path, tiny_sd)
    cli(["sweep", "--config", str(config)])
    out = tmp_path / "sweep"
    assert [c[:3] for c in calls] == [("adamw", 1e-3, 0), ("adamw", 0.1, 0), ("scaled_adamw", 1e-3, 0),
                                      ("scaled_adamw", 0.1, 0)]
    rows = read_csv(out / "results.csv")
    assert [(r["optimizer"], float(r["learning_rate"])) for r in rows] == [
        ("adamw", 1e-3), ("adamw", 0.1), ("scaled_adamw", 1e-3), ("scaled_adamw", 0.1)]
    for r in rows:
        assert r["status"] == "ok" and r["steps"] == "2" and math.isfinite(float(r["final_loss"]))
        for key in ("clip_i", "clip_t", "dino"):
            assert -1.0 <= float(r[key]) <= 1.0
        run_dir = out / r["run_dir"]
        assert (run_dir / "pytorch_lora_weights.safetensors").is_file()
        assert (run_dir / "sweep_samples.png").is_file()
    assert (out / "adamw-lr0.001-s0").is_dir() and (out / "scaled_adamw-lr0.1-s0").is_dir()
    for name in ("plot_clip_i.png", "plot_clip_t.png", "plot_dino.png", "plot_final_loss.png"):
        with Image.open(out / name) as im:
            assert im.width > 100 and im.height > 100
    summary = (out / "summary.md").read_text()
    assert "| adamw | 2 | 0 |" in summary and "| scaled_adamw | 2 | 0 |" in summary
    assert "2.0 decades" in summary

    # rerun: every run is finished, nothing trains, the CSV is the same
    calls.clear()
    cli(["sweep", "--config", str(config)])
    assert calls == []
    assert read_csv(out / "results.csv") == rows

    # eval settings changed: every run is re-scored from its LoRA, none is retrained
    config = write_sweep(tmp_path, tiny_sd, eval={"seeds": [1]})
    cli(["sweep", "--config", str(config)])
    assert calls == []
    again = read_csv(out / "results.csv")
    assert [r["final_loss"] for r in again] == [r["final_loss"] for r in rows]
    assert [r["clip_i"] for r in again] != [r["clip_i"] for r in rows]  # other sampling seed, other images

    # base settings changed: the finished runs no longer match; refused, not silently reused
    config = write_sweep(tmp_path, tiny_sd, base={"max_train_steps": 3})
    with pytest.raises(SystemExit) as exc:
        cli(["sweep", "--config", str(config)])
    err = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert exc.value.code == 2 and len(err) == 1 and "other base settings" in err[0]
    assert calls == []


def test_diverged_run_is_a_result_not_an_error(tiny_sd, tmp_path, monkeypatch):
    from difflora.errors import UserError

    def exploding_train(cfg):
        raise UserError("the loss became nan at step 2; the last good checkpoint is none; lower --learning_rate")

    monkeypatch.setattr(sweep_mod, "_train", exploding_train)
    cfg = parse_config(SweepConfig, ["--config", str(write_sweep(tmp_path, tiny_sd)), "--optimizers", "sgd",
                                     "--learning_rates", "10"])
    rows = sweep_mod.sweep(cfg)
    assert rows[0]["status"] == "diverged" and math.isnan(rows[0]["final_loss"])
    assert read_csv(tmp_path / "sweep" / "results.csv")[0]["status"] == "diverged"


@pytest.mark.parametrize("over, message", [
    ({"base": {"output_dir": "x"}}, "base sets output_dir"),
    ({"optimizers": ["adamw", "adam"]}, "unknown --optimizer 'adam'"),
    ({"eval": {"clip_modle": "x"}}, "unknown eval option 'clip_modle'"),
    ({"eval": {"prompts": ["a photo"]}}, "must contain exactly one {}"),
    ({"learning_rates": [0.0]}, "learning_rates must list positive numbers"),
    ({"base": {"instance_data_dir": "/nonexistent/folder"}}, "does not exist"),
])
def test_bad_sweep_files_fail_before_any_run(tiny_sd, tmp_path, capsys, over, message):
    with pytest.raises(SystemExit) as exc:
        cli(["sweep", "--config", str(write_sweep(tmp_path, tiny_sd, **over))])
    err = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert exc.value.code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("name", ["tiny.yaml", "sd15.yaml"])
def test_shipped_sweep_configs_parse(name, monkeypatch):
    from difflora.train.dreambooth import DreamBoothConfig

    monkeypatch.chdir(ROOT)  # the configs name repo-relative paths, as their first line says

    path = ROOT / "configs" / "sweeps" / name
    assert path.read_text().splitlines()[0].startswith("# "), "the first line says how to run it"
    assert "difflora sweep --config configs/sweeps/" + name in path.read_text().splitlines()[0]
    cfg = parse_config(SweepConfig, ["--config", str(path)])
    lrs = sorted(cfg.learning_rates)
    assert math.log10(lrs[-1] / lrs[0]) >= 4 - 1e-9  # at least four decades
    assert {"adamw", "scaled_adamw", "sgd", "scaled_sgd"} <= set(cfg.optimizers)
    assert all("{}" in t for t in prompt_templates(eval_settings(cfg)))
    db = parse_config(DreamBoothConfig, sweep_mod.dreambooth_argv(cfg.base, optimizer="adamw", learning_rate=1e-3,
                                                                   seed=0, output_dir="x"))
    assert db.optimizer == "adamw" and db.learning_rate == 1e-3


def test_shipped_prompt_sets_are_the_dreambooth_templates():
    from difflora.sampling import read_prompts

    for name in ("dreambooth_object.txt", "dreambooth_live.txt"):
        templates = read_prompts(ROOT / "configs" / "prompts" / name)
        assert len(templates) == 25 and all(t.count("{}") == 1 for t in templates)
        assert templates[0] == "a {} in the jungle" and templates[-1] == "a cube shaped {}"
