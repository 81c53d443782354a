"""``--compile``: the compiled UNet trains like the eager one, and its LoRA file loads."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from difflora.config import parse_config
from difflora.train.dreambooth import DreamBoothConfig, train
from difflora.train.engine import compile_forward


@pytest.fixture(scope="module")
def compile_works() -> None:
    """Skip where torch.compile cannot build a kernel here (e.g. no C compiler for inductor on CPU)."""
    try:
        torch.compile(lambda x: x * 2 + 1, dynamic=False)(torch.ones(3))
    except Exception as err:  # noqa: BLE001 - any failure means compile is unavailable on this machine
        pytest.skip(f"torch.compile is unavailable here: {str(err).strip().splitlines()[0][:200]}")


def _losses(argv: list[str]) -> list[float]:
    seen: list[float] = []
    train(parse_config(DreamBoothConfig, argv), [lambda step, trainer: seen.append(trainer.losses[-1]) if step else None])
    return seen


def test_compiled_run_matches_eager_and_its_lora_loads(compile_works, db_args, tiny_sd, tmp_path, caplog):
    from diffusers import StableDiffusionPipeline

    common = ("--max_train_steps", "3", "--num_validation_images", "0", "--learning_rate", "1e-2")
    eager = _losses(db_args("eager", *common))
    with caplog.at_level(logging.WARNING, logger="difflora.train.engine"):
        compiled = _losses(db_args("compiled", *common, "--compile"))
    assert "--compile" not in caplog.text  # it compiled: no fallback to eager
    assert len(compiled) == len(eager) == 3
    assert compiled == pytest.approx(eager, rel=1e-3, abs=1e-5)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.load_lora_weights(tmp_path / "compiled")
    from safetensors.torch import load_file

    a = load_file(tmp_path / "eager" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "compiled" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()  # the same parameter names: the module was not wrapped
    # Adam's first steps move each weight by about lr * sign(gradient): a gradient that is rounding noise
    # may take either sign, so the files are compared as a whole, not element by element.
    diff = torch.cat([(a[k] - b[k]).flatten() for k in a]).norm()
    size = torch.cat([a[k].flatten() for k in a]).norm()
    assert diff <= 1e-2 * size, f"compiled weights differ by {float(diff / size):.2e} of their norm"


def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch, caplog):
    def broken(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no C compiler\nsecond line")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    layer = nn.Linear(3, 2)
    x = torch.ones(1, 3)
    expected = layer(x)
    compile_forward(layer)
    with caplog.at_level(logging.WARNING, logger="difflora.train.engine"):
        out = layer(x)
        again = layer(x)
    assert torch.equal(out, expected) and torch.equal(again, expected)
    warnings = [r.getMessage() for r in caplog.records if "--compile" in r.getMessage()]
    assert warnings == ["--compile: torch.compile failed (no C compiler); training eagerly"]
