"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, token states as the only conditioning."""

from __future__ import annotations

from difflora.families.base import ModelFamily


class StableDiffusion(ModelFamily):
    name = "sd"
    label = "SD 1.x / 2.x"
