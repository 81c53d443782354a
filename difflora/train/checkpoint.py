"""Checkpoints that survive being killed mid-write, and resuming from them.

A checkpoint is a folder ``checkpoint-<step>/`` holding the trainable weights, the optimizer and
LR-scheduler states and ``state.json``. It is written under a hidden temporary name and renamed
into place only when complete, so ``latest`` can never pick a half-written one. Randomness in the
training loop is a pure function of (seed, step), so no RNG state needs saving for a bit-identical
resume on CPU.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from difflora.errors import UserError

_NAME = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if _NAME.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def save_checkpoint(output_dir: Path, step: int, weights: dict[str, torch.Tensor], optimizer: Any,
                    lr_scheduler: Any, state: dict[str, Any], total_limit: int | None = None) -> Path:
    """Write ``checkpoint-<step>`` atomically, then prune the oldest beyond ``total_limit``."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, tmp / "weights.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(lr_scheduler.state_dict(), tmp / "scheduler.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
    if final.exists():
        old = output_dir / f".checkpoint-{step}.old"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    if total_limit is not None and total_limit > 0:
        for stale in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def resolve_resume(output_dir: Path, resume: str | None) -> Path | None:
    """Turn ``latest`` or a path into a checkpoint folder (``None`` if nothing to resume)."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_absolute() and not path.exists():
        path = output_dir / resume
    if not (path / "state.json").is_file():
        raise UserError(f"checkpoint '{resume}' does not exist or is incomplete; "
                        "pass 'latest' or a checkpoint-N folder")
    return path


def load_checkpoint(path: Path, named_params: dict[str, torch.nn.Parameter], optimizer: Any, lr_scheduler: Any,
                    expect: dict[str, Any]) -> dict[str, Any]:
    """Restore weights and optimizer / scheduler states; refuse a checkpoint of another model."""
    state = json.loads((path / "state.json").read_text())
    for key, value in expect.items():
        if state.get(key) != value:
            raise UserError(f"checkpoint '{path}' was made with {key}={state.get(key)!r}, this run has "
                            f"{value!r}; resume with the same settings or start a new output_dir")
    weights = load_file(path / "weights.safetensors")
    if set(weights) != set(named_params):
        missing = sorted(set(named_params) ^ set(weights))[0]
        raise UserError(f"checkpoint '{path}' does not match this model (e.g. '{missing}'); "
                        "resume with the same base model, rank and targets")
    with torch.no_grad():
        for name, p in named_params.items():
            p.copy_(weights[name])
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    lr_scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    return state
