"""Every shipped Mix-of-Show config parses into its job's dataclass."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from difflora.config import parse_config
from difflora.mix_of_show.edlora import EDLoRAConfig
from difflora.mix_of_show.fuse import FuseConfig
from difflora.mix_of_show.regions import RegionsConfig

CONFIGS = sorted((Path(__file__).parents[2] / "configs" / "mix_of_show").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses(path):
    if path.name.endswith("_concepts.yaml"):
        entries = yaml.safe_load(path.read_text())
        assert all({"lora", "words"} <= set(e) for e in entries)
        words = [w for e in entries for w in str(e["words"]).split("+")]
        assert len(words) == len(set(words))
        return
    cls = (FuseConfig if path.name.endswith("_fuse.yaml") else RegionsConfig if path.name.endswith("_regions.yaml")
           else EDLoRAConfig)
    cfg = parse_config(cls, ["--config", str(path)])
    assert cfg.output_dir
