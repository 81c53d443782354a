"""Shared fixtures: tiny offline models, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """A tiny SD 1.x-layout folder (epsilon) with clip/ and dino/ evaluation models."""
    from difflora.tiny_models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-sd") / "model")


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory) -> Path:
    """The SD 2.x-like variant: v-prediction."""
    from difflora.tiny_models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-sd-v") / "model", prediction_type="v_prediction",
                           with_eval_models=False)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    """A tiny SDXL-layout folder (two text encoders, text_time conditioning)."""
    from difflora.tiny_models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-sdxl") / "model", sdxl=True, with_eval_models=False)


@pytest.fixture
def child_error():
    """``child_error(stderr)``: a launched child's own one-line errors first, then the tail (the
    launcher's summary would otherwise push them out of the assertion message)."""
    def pick(stderr: str) -> str:
        own = [line for line in stderr.splitlines() if "error:" in line and "torch" not in line]
        return "\n".join(own[-5:]) + "\n...\n" + stderr[-1500:]

    return pick
