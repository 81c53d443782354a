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
        (["--name", "x", "--stepz", "3"], "unknown option 'stepz'; valid options: flag, lr, maybe"),
        (["--name", "x", "--steps", "3.5"], "expects an integer"),
        (["--name", "x", "--flag", "maybe"], "expects true or false"),
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


def test_yaml_unknown_key_refused(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: a\nlearning_rat: 1\n")
    with pytest.raises(UserError, match="unknown option 'learning_rat'"):
        parse_config(Job, ["--config", str(f)])
