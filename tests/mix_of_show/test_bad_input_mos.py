"""Mix-of-Show inputs from flags and files are checked before any model loads: one line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from difflora.cli import main as cli_main
from difflora.errors import UserError
from difflora.mix_of_show.regions import parse_region, resolve_box


def cli_fails(argv: list[str], capsys, expect: str) -> str:
    with pytest.raises(SystemExit) as exc:
        cli_main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"difflora {argv[0]}: error: ") and expect in last, err
    return last


@pytest.fixture
def config_only_model(tmp_path) -> Path:
    """A folder with just the configs sample-regions reads before loading weights (64 px images)."""
    model = tmp_path / "model"
    for sub, cfg in (("unet", {"sample_size": 32}), ("vae", {"block_out_channels": [4, 8]})):
        (model / sub).mkdir(parents=True)
        (model / sub / "config.json").write_text(json.dumps(cfg))
    return model


# ---- region boxes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["nan,0,1,1|a", "0,0,inf,1|a", "0,0,1,-nan|a", "a,b,c,d|a", "0,0,1|a"])
def test_region_flag_with_bad_numbers_is_refused(text):
    with pytest.raises(UserError, match="region"):
        parse_region(text, 64, 64)


@pytest.mark.parametrize("box", ["0,0,1,1", 5, None, [0, 0, "1", 1], [0, 0, True, 1], [0.0, 0.0, float("nan"), 1.0],
                                 {"x0": 0}, [0, 0, 1]])
def test_layout_box_that_is_not_four_finite_numbers_is_refused(box):
    with pytest.raises(UserError, match="layout region 1 box"):
        resolve_box(box, 64, 64, what="layout region 1 box")


@pytest.mark.parametrize("layout, expect", [
    ("regions:\n  - box: [0, 0, .nan, 1]\n    prompt: a robot\n", "finite"),
    ("regions:\n  - box: [0, 0, x, 1]\n    prompt: a robot\n", "must be 4 numbers"),
    ("regions:\n  - box: '0,0,1,1'\n    prompt: a robot\n", "must be 4 numbers"),
    ("regions:\n  - box: 7\n    prompt: a robot\n", "must be 4 numbers"),
    ("regions:\n  - box: [0, 0, 1, 1]\n    prompt: [a, robot]\n", "'prompt' must be non-empty text"),
    ("regions:\n  - box: [0, 0, 1, 1]\n    prompt: a\n    negative_prompt: {x: 1}\n", "'negative_prompt' must be"),
    ("prompt: {a: 1}\nregions: []\n", "'prompt' must be text"),
])
def test_layout_file_values_are_checked(layout, expect, config_only_model, tmp_path, capsys):
    (tmp_path / "layout.yaml").write_text(layout)
    cli_fails(["sample-regions", "--model", str(config_only_model), "--output_dir", str(tmp_path / "out"),
               "--prompt", "two friends", "--layout", str(tmp_path / "layout.yaml")], capsys, expect)
    assert not (tmp_path / "out").exists()


def test_layout_file_that_is_not_utf8(config_only_model, tmp_path, capsys):
    (tmp_path / "layout.yaml").write_bytes(b"prompt: caf\xe9\n")
    cli_fails(["sample-regions", "--model", str(config_only_model), "--output_dir", str(tmp_path / "out"),
               "--layout", str(tmp_path / "layout.yaml")], capsys, "not UTF-8")


def test_condition_image_that_is_not_an_image(config_only_model, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "config.json").write_text("{}")
    (tmp_path / "pose.png").write_text("not a picture")
    cli_fails(["sample-regions", "--model", str(config_only_model), "--output_dir", str(tmp_path / "out"),
               "--prompt", "a", "--adapter", str(adapter), "--condition", str(tmp_path / "pose.png")],
              capsys, "cannot read image")


@pytest.mark.parametrize("flag", ["--height", "--width"])
def test_regions_size_must_be_a_multiple_of_8(flag, config_only_model, tmp_path, capsys):
    cli_fails(["sample-regions", "--model", str(config_only_model), "--output_dir", str(tmp_path / "out"),
               "--prompt", "a", flag, "100"], capsys, f"{flag} must be a positive multiple of 8")


def test_damaged_concepts_json_in_the_model(config_only_model, tmp_path, capsys):
    (config_only_model / "concepts.json").write_text("{not json")
    cli_fails(["sample-regions", "--model", str(config_only_model), "--output_dir", str(tmp_path / "out"),
               "--prompt", "a <robot>"], capsys, "concepts.json' is not valid JSON")


# ---- fuse -----------------------------------------------------------------------------------------


def _fuse_argv(tmp_path: Path, concepts: str, *extra: str) -> list[str]:
    (tmp_path / "a.safetensors").write_bytes(b"")  # checked for existence only: scales fail first
    (tmp_path / "concepts.yaml").write_text(concepts)
    return ["fuse", "--concepts", str(tmp_path / "concepts.yaml"), "--pretrained_model_name_or_path",
            str(tmp_path / "no-model"), "--output_dir", str(tmp_path / "out"), *extra]


@pytest.mark.parametrize("scale, expect", [
    (".nan", "scale must be a finite number"),
    ("nan", "scale must be a finite number"),
    (".inf", "scale must be a finite number"),
    ("abc", "scale must be a number"),
    ("[1]", "scale must be a number"),
    ("true", "scale must be a number"),
])
def test_bad_fuse_scale_is_refused_before_the_model_loads(scale, expect, tmp_path, capsys):
    argv = _fuse_argv(tmp_path, f"- lora: a.safetensors\n  words: robot\n  scale: {scale}\n")
    last = cli_fails(argv, capsys, expect)
    assert "concept 1" in last  # not the base model, which does not exist either


def test_fuse_concept_lora_missing_is_refused_before_the_model_loads(tmp_path, capsys):
    argv = _fuse_argv(tmp_path, "- lora: missing.safetensors\n  words: robot\n")
    cli_fails(argv, capsys, "LoRA 'missing.safetensors' does not exist")


@pytest.mark.parametrize("extra, expect", [
    (["--resolution", "60"], "--resolution must be a positive multiple of 8"),
    (["--prompt_templates", "a {} in {style}"], "may hold only '{}'"),
    (["--ridge", "nan"], "option 'ridge' must be a finite number"),
    (["--concept_weighting", "tokens"], "option 'concept_weighting' must be one of equal, rows"),
])
def test_fuse_flags_are_checked(extra, expect, tmp_path, capsys):
    cli_fails(_fuse_argv(tmp_path, "- lora: a.safetensors\n  words: robot\n", *extra), capsys, expect)
