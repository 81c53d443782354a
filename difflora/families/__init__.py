"""Model families: what differs between Stable Diffusion 1.x/2.x, SDXL, and the next one.

A :class:`ModelFamily` owns everything that depends on the architecture: which components a
pipeline folder holds, how they load, how a prompt becomes UNet conditioning (hidden states, pooled
embeddings, SDXL's size/crop time ids), which pipeline class samples it, the kohya name prefixes of
its text encoders and the LoRA target presets. Nothing outside this package branches on the family.
Adding a family is one new module with a subclass plus one :func:`register` call.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from difflora.families.base import Conditioning, ModelFamily
from difflora.families.sd import StableDiffusion
from difflora.families.sdxl import StableDiffusionXL

FAMILIES: dict[str, ModelFamily] = {}


def register(family: ModelFamily) -> ModelFamily:
    """Make ``family`` known to :func:`family_for`; later registrations are tried first."""
    FAMILIES[family.name] = family
    return family


def family_for(components: set[str]) -> ModelFamily:
    """The family whose component set a pipeline folder (``model_index.json`` keys) matches best."""
    for family in reversed(list(FAMILIES.values())):
        if family.matches(components):
            return family
    return FAMILIES["sd"]


def family_named(name: str) -> ModelFamily:
    return FAMILIES[name]


def family_of_pipeline(pipe: Any) -> ModelFamily:
    """The family of a pipeline object (from the components it holds)."""
    return family_for({name for name, value in pipe.components.items() if value is not None})


def family_of_folder(path: str | Path) -> ModelFamily:
    """The family of a local diffusers folder, from its ``model_index.json`` (SD when unreadable)."""
    try:
        declared = json.loads((Path(path) / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return FAMILIES["sd"]
    return family_for(set(declared) if isinstance(declared, dict) else set())


register(StableDiffusion())
register(StableDiffusionXL())

__all__ = ["FAMILIES", "Conditioning", "ModelFamily", "family_for", "family_named", "family_of_folder",
           "family_of_pipeline", "register"]
