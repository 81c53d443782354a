"""Every shipped DreamBooth config parses into its job's dataclass (torchtune's config test)."""

from pathlib import Path

import pytest

from difflora.config import parse_config
from difflora.train.dreambooth import DreamBoothConfig

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "dreambooth").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_dreambooth_config_parses(path):
    cfg = parse_config(DreamBoothConfig, ["--config", str(path)])
    assert cfg.optimizer == "scaled_adamw"
    assert cfg.resolution % 8 == 0
    first = path.read_text().splitlines()[0]
    assert first.startswith("# difflora dreambooth --config"), "the first line says how to run it"


def test_command_line_overrides_config():
    cfg = parse_config(DreamBoothConfig, ["--config", str(CONFIGS[0]), "learning_rate=3e-4", "--rank", "8"])
    assert cfg.learning_rate == 3e-4 and cfg.rank == 8
