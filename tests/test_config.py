from dataclasses import dataclass, field
from typing import Literal

import pytest

from difflora.config import parse_config
from difflora.errors import UserError


@dataclass
class Job:
    """A job."""

    name: str = field(metadata={"help": "required"})
    steps: int = 10
    lr: float = 1e-4
    flag: bool = False
    seeds: list[int] = field(default_factory=lambda: [0])
    mode: Literal["a", "b"] = "a"
    maybe: str | None = None


def test_cli_forms_and_precedence(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("name: from_yaml\nsteps: 5\nlr: 3e-4\n")
    cfg = parse_config(Job, ["--config", str(cfg_file), "--steps=7", "--flag"])
    assert (cfg.name, cfg.steps, cfg.lr, cfg.flag) == ("from_yaml", 7, 3e-4, True)
    cfg = parse_config(Job, ["name=x", "--seeds", "1", "2", "--seeds", "3", "--mode", "b", "--maybe", "none"])
    assert cfg.seeds == [1, 2, 3] and cfg.mode == "b" and cfg.maybe is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--name", "x", "--stepz", "3"], "unknown option 'stepz'; did you mean --steps? valid options: flag, lr, maybe"),
        (["--name", "x", "--steps", "3.5"], "expects an integer"),
        (["--name", "x", "--flag=maybe"], "expects true or false"),
        (["--name", "x", "--flag", "maybe"], "unexpected argument 'maybe'"),
        (["--name", "x", "--mode", "c"], "must be one of a, b"),
        (["--steps", "3"], "missing required option(s): --name"),
        (["--name", "x", "--config", "/nonexistent.yaml"], "does not exist"),
    ],
)
def test_bad_input_is_one_clear_line(argv, message):
    with pytest.raises(UserError) as err:
        parse_config(Job, argv)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_bare_boolean_flag_takes_only_a_boolean_literal():
    assert parse_config(Job, ["--flag", "--name", "x"]).flag is True
    assert parse_config(Job, ["--name", "x", "--flag", "false"]).flag is False
    assert parse_config(Job, ["--name", "x", "--flag", "Yes", "--steps", "2"]).flag is True
    # the positional field is filled wherever the bare argument stands, never swallowed by a flag
    cfg = parse_config(Job, ["--flag", "DIR"], positional="name")
    assert (cfg.flag, cfg.name) == (True, "DIR")
    cfg = parse_config(Job, ["DIR", "--flag", "off"], positional="name")
    assert (cfg.flag, cfg.name) == (False, "DIR")


def test_make_tiny_model_sdxl_flag_before_folder(tmp_path, monkeypatch):
    import difflora.tiny_models as tiny

    seen = {}
    monkeypatch.setattr(tiny, "make_tiny_model", lambda out, **kw: seen.update(out=out, **kw))
    tiny.main(["--sdxl", str(tmp_path / "m")])
    assert seen["out"] == tmp_path / "m" and seen["sdxl"] is True


def test_yaml_unknown_key_refused(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: a\nlearning_rat: 1\n")
    with pytest.raises(UserError, match="unknown option 'learning_rat'"):
        parse_config(Job, ["--config", str(f)])


def test_mistyped_option_gets_a_suggestion():
    with pytest.raises(UserError, match=r"unknown option 'flg'; did you mean --flag\?"):
        parse_config(Job, ["--name", "x", "--flg"])


def test_help_groups_options_by_the_group_that_declares_them():
    from difflora.config import format_help
    from difflora.train.dreambooth import DreamBoothConfig

    text = format_help(DreamBoothConfig, "difflora dreambooth")
    titles = [line for line in text.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert titles[:3] == ["Model:", "Data:", "LoRA:"] and "DreamBooth options:" in titles
    section = text.split("Optimizer:")[1].split("\n\n")[0]
    assert "--adam_beta1 float (default: 0.9)" in section and "--learning_rate" not in section
    assert "--mixed_precision {no,fp16,bf16}" in text


def test_kohya_enable_bucket_is_an_alias_of_bucket(tmp_path):
    """kohya's --enable_bucket sets --bucket, on the command line and in a config file."""
    from difflora.train.dreambooth_config import DreamBoothConfig

    concept = tmp_path / "c"
    concept.mkdir()
    base = ["--pretrained_model_name_or_path", "x", "--instance_data_dir", str(concept), "--instance_prompt", "a"]
    assert parse_config(DreamBoothConfig, base).bucket is False
    assert parse_config(DreamBoothConfig, [*base, "--enable_bucket"]).bucket is True
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("enable_bucket: true\n")
    assert parse_config(DreamBoothConfig, [*base, "--config", str(yaml_file)]).bucket is True
