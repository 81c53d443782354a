"""Checkpoints that survive being killed mid-write, resume bit-identically and never run code.

A checkpoint is a folder ``checkpoint-<step>/`` holding ``weights.safetensors`` (the trainable
weights), the optimizer and LR-scheduler states (``optimizer.json`` + ``optimizer.safetensors``,
``scheduler.json`` + ``scheduler.safetensors``: tensors in safetensors, every other value as JSON),
with ``--use_ema`` the EMA of the weights (``ema.json`` + ``ema.safetensors``: diffusers' ``EMAModel``
state, the shadow weights and the step count its decay depends on) and ``state.json``. Nothing is pickled, so a checkpoint folder someone else crafted can be refused
but cannot run code when it is read. Every file is checked against the live model, optimizer and
scheduler before anything is applied: a truncated or malformed checkpoint is one
:class:`UserError` line, not a traceback steps later.

A checkpoint is written under a hidden temporary name and renamed into place only when complete,
so ``latest`` can never pick a half-written one, and only finite weights are ever written, so every
checkpoint is a "last good" one. Randomness in the training loop is a pure function of
(seed, example), so no RNG state needs saving for a bit-identical resume on CPU.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from difflora.errors import UserError

_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FORMAT = "difflora-state/1"
_PLAIN = (bool, int, float, str)
_MAX_DEPTH = 32
# Optimizer state entries that hold one value per parameter element (torch's AdamW / SGD and ours).
_PARAM_SHAPED = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


class _Malformed(ValueError):
    """A checkpoint file that is not what this version writes; becomes a UserError naming the folder."""


# ------------------------------------------------------------------------------------------------
# state_dict <-> (JSON document, tensors): the pickle-free format of optimizer and scheduler states
# ------------------------------------------------------------------------------------------------


def flatten_state(obj: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a state_dict into a JSON-able document and the tensors it references.

    Lists and plain values stay as they are; tuples, dicts (whose keys may be ints) and tensors
    become one-key objects ``{"tuple": [...]}``, ``{"dict": [[key, value], ...]}`` and
    ``{"tensor": "t3"}``, so decoding is unambiguous and gives back the same Python types.
    """
    tensors: dict[str, torch.Tensor] = {}

    def enc(x: Any) -> Any:
        if x is None or isinstance(x, _PLAIN):
            return x
        if isinstance(x, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = x.detach().to("cpu", copy=True).contiguous()
            return {"tensor": key}
        if isinstance(x, list):
            return [enc(v) for v in x]
        if isinstance(x, tuple):
            return {"tuple": [enc(v) for v in x]}
        if isinstance(x, dict):
            return {"dict": [[enc(k), enc(v)] for k, v in x.items()]}
        raise TypeError(f"cannot store a {type(x).__name__} in a checkpoint: only tensors and plain values")

    return enc(obj), tensors


def unflatten_state(doc: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`; raises ``ValueError`` on anything it would not have written."""

    def dec(x: Any, depth: int) -> Any:
        if depth > _MAX_DEPTH:
            raise _Malformed("nested too deeply")
        if x is None or isinstance(x, _PLAIN):
            return x
        if isinstance(x, list):
            return [dec(v, depth + 1) for v in x]
        if isinstance(x, dict) and len(x) == 1:
            ((tag, body),) = x.items()
            if tag == "tensor" and isinstance(body, str):
                if body not in tensors:
                    raise _Malformed(f"tensor '{body}' is missing from the safetensors file")
                return tensors[body]
            if tag == "tuple" and isinstance(body, list):
                return tuple(dec(v, depth + 1) for v in body)
            if tag == "dict" and isinstance(body, list):
                out = {}
                for pair in body:
                    if not (isinstance(pair, list) and len(pair) == 2 and (pair[0] is None or
                                                                            isinstance(pair[0], _PLAIN))):
                        raise _Malformed("a dict entry is not a [plain key, value] pair")
                    out[pair[0]] = dec(pair[1], depth + 1)
                return out
        raise _Malformed(f"unexpected entry {json.dumps(x)[:60]}")

    return dec(doc, 0)


def save_state(obj: Any, folder: Path, stem: str) -> None:
    """Write ``stem.json`` and ``stem.safetensors`` (a state_dict without pickle)."""
    doc, tensors = flatten_state(obj)
    save_file(tensors, folder / f"{stem}.safetensors")
    (folder / f"{stem}.json").write_text(json.dumps({"format": STATE_FORMAT, "value": doc}))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _Malformed(f"{path.name} is missing") from None
    except (OSError, ValueError, RecursionError) as err:  # ValueError covers bad JSON and bad UTF-8
        raise _Malformed(f"{path.name} is not valid JSON ({type(err).__name__})") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise _Malformed(f"{path.name} is missing")
    try:
        return load_file(path)
    except (OSError, SafetensorError, ValueError, RuntimeError) as err:
        detail = str(err).strip().splitlines()[0][:80] if str(err).strip() else type(err).__name__
        raise _Malformed(f"{path.name} is truncated or not a safetensors file ({detail})") from None


def load_state(folder: Path, stem: str) -> Any:
    """Read what :func:`save_state` wrote; raises ``ValueError`` for a missing or malformed file."""
    doc = _read_json(folder / f"{stem}.json")
    if not (isinstance(doc, dict) and doc.get("format") == STATE_FORMAT and "value" in doc):
        raise _Malformed(f"{stem}.json is not a difflora state file ({STATE_FORMAT})")
    return unflatten_state(doc["value"], _read_tensors(folder / f"{stem}.safetensors"))


# ------------------------------------------------------------------------------------------------
# Finite weights only
# ------------------------------------------------------------------------------------------------


def nonfinite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first tensor holding a NaN or an infinity, or ``None`` if all are finite.

    One device synchronisation for all tensors, so it is cheap enough to run every step.
    """
    if not tensors:
        return None
    flags = [torch.isfinite(t.detach()).all() for t in tensors.values()]
    flags = torch.stack([f.to(flags[0].device) for f in flags]).cpu()
    if bool(flags.all()):
        return None
    return list(tensors)[int((~flags).nonzero()[0])]


def describe(path: Path | None, output_dir: Path) -> str:
    """How an error message names a checkpoint: its folder name inside output_dir, else its path."""
    if path is None:
        return "none (no checkpoint was saved)"
    return path.name if path.parent.resolve() == output_dir.resolve() else str(path)


# ------------------------------------------------------------------------------------------------
# Writing and finding checkpoints
# ------------------------------------------------------------------------------------------------


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if _NAME.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def save_checkpoint(output_dir: Path, step: int, weights: dict[str, torch.Tensor], optimizer: Any,
                    lr_scheduler: Any, state: dict[str, Any], total_limit: int | None = None,
                    ema: Any = None) -> Path:
    """Write ``checkpoint-<step>`` atomically, then prune the oldest beyond ``total_limit``.

    Refuses non-finite weights: a checkpoint must always be safe to name as the last good one.
    """
    bad = nonfinite(weights)
    if bad is not None:
        raise UserError(f"not saving checkpoint-{step}: weight '{bad}' is NaN or infinite; "
                        "lower the learning rate and train again")
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, tmp / "weights.safetensors")
    save_state(optimizer.state_dict(), tmp, "optimizer")
    save_state(lr_scheduler.state_dict(), tmp, "scheduler")
    if ema is not None:  # diffusers' EMAModel: plain values and the list of shadow weights
        save_state(ema.state_dict(), tmp, "ema")
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


# ------------------------------------------------------------------------------------------------
# Reading a checkpoint: check everything against the live run, then apply
# ------------------------------------------------------------------------------------------------


def _kind(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)}"
    return "None" if x is None else f"a {type(x).__name__}"


def _check_like(saved: Any, template: Any, where: str, loose_none: bool) -> None:
    """Refuse ``saved`` unless it has the structure, types and tensor shapes of ``template``.

    ``loose_none``: a ``None`` in the template also accepts a plain value (optimizer options such as
    ``foreach`` are ``None`` or a bool).
    """
    if isinstance(template, torch.Tensor):
        ok = isinstance(saved, torch.Tensor) and saved.shape == template.shape
    elif isinstance(template, bool):
        ok = isinstance(saved, bool)
    elif isinstance(template, (int, float)):
        ok = isinstance(saved, (int, float)) and not isinstance(saved, bool)
    elif isinstance(template, str):
        ok = isinstance(saved, str)
    elif template is None:
        ok = saved is None or (loose_none and isinstance(saved, _PLAIN))
    elif isinstance(template, (list, tuple)):
        ok = isinstance(saved, (list, tuple)) and len(saved) == len(template)
        if ok:
            for i, (s, t) in enumerate(zip(saved, template)):
                _check_like(s, t, f"{where}[{i}]", loose_none)
    elif isinstance(template, dict):
        ok = isinstance(saved, dict)
        if ok:
            for key in saved.keys() & template.keys():
                _check_like(saved[key], template[key], f"{where}.{key}", loose_none)
    else:
        ok = True
    if not ok:
        raise _Malformed(f"{where} is {_kind(saved)}, expected {_kind(template)}")


def _check_optimizer_state(saved: Any, optimizer: Any) -> None:
    """Refuse an optimizer state that would not fit this run's parameter groups and parameters."""
    current = optimizer.state_dict()
    if not (isinstance(saved, dict) and isinstance(saved.get("state"), dict)
            and isinstance(saved.get("param_groups"), list)):
        raise _Malformed("the optimizer state has no 'state' and 'param_groups'")
    groups, live_groups = saved["param_groups"], optimizer.param_groups
    if len(groups) != len(live_groups):
        raise _Malformed(f"the optimizer has {len(groups)} parameter groups, this run {len(live_groups)}")
    by_id: dict[int, torch.Tensor] = {}
    for i, (group, template, live) in enumerate(zip(groups, current["param_groups"], live_groups)):
        ids = group.get("params") if isinstance(group, dict) else None
        if not (isinstance(ids, list) and len(ids) == len(live["params"])):
            raise _Malformed(f"optimizer group {i} does not hold this run's {len(live['params'])} parameters")
        _check_like({k: v for k, v in group.items() if k != "params"},
                    {k: v for k, v in template.items() if k != "params"}, f"optimizer group {i}", loose_none=True)
        if "param_names" in template and group.get("param_names") != template["param_names"]:
            raise _Malformed(f"optimizer group {i} names other parameters than this run's")
        for pid, p in zip(ids, live["params"]):
            if not isinstance(pid, int) or isinstance(pid, bool) or pid in by_id:
                raise _Malformed(f"optimizer group {i} has a bad parameter index {pid!r}")
            by_id[pid] = p
    for pid, entry in saved["state"].items():
        if pid not in by_id or not isinstance(entry, dict):
            raise _Malformed(f"the optimizer state has an entry for unknown parameter {pid!r}")
        shape = tuple(by_id[pid].shape)
        for key, value in entry.items():
            if not (isinstance(value, torch.Tensor) or isinstance(value, (int, float))
                    and not isinstance(value, bool)):
                raise _Malformed(f"optimizer state '{key}' of parameter {pid} is {_kind(value)}")
            if key in _PARAM_SHAPED and not (isinstance(value, torch.Tensor) and tuple(value.shape) == shape):
                raise _Malformed(f"optimizer state '{key}' of parameter {pid} is {_kind(value)}, "
                                 f"the parameter has shape {shape}")
            if key == "step" and isinstance(value, torch.Tensor) and value.numel() != 1:
                raise _Malformed(f"optimizer step of parameter {pid} is {_kind(value)}")


def _check_scheduler_state(saved: Any, lr_scheduler: Any) -> None:
    """Refuse a scheduler state unlike this run's: it is copied into the scheduler's attributes."""
    current = lr_scheduler.state_dict()
    _check_like(saved, current, "scheduler", loose_none=False)
    shadowing = [k for k in saved if k not in current and (not isinstance(k, str) or hasattr(lr_scheduler, k))]
    if shadowing:
        raise _Malformed(f"the scheduler state sets {shadowing[0]!r}, which is not scheduler state")


def _check_state_json(state: Any) -> dict[str, Any]:
    def is_int(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if not isinstance(state, dict):
        raise _Malformed("state.json is not a JSON object")
    if not (is_int(state.get("step")) and state["step"] >= 0):
        raise _Malformed("state.json has no step count")
    losses = state.get("losses", [])
    if not (isinstance(losses, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                             for v in losses)):
        raise _Malformed("state.json 'losses' is not a list of numbers")
    if state.get("frozen_at") is not None and not is_int(state["frozen_at"]):
        raise _Malformed("state.json 'frozen_at' is not a step number")
    return state


def load_checkpoint(path: Path, named_params: dict[str, torch.nn.Parameter], optimizer: Any, lr_scheduler: Any,
                    expect: dict[str, Any], ema: Any = None,
                    defaults: dict[str, tuple[Any, Any]] | None = None) -> dict[str, Any]:
    """Restore weights and optimizer / scheduler (and EMA, if given) states; refuse a checkpoint of another model.

    ``expect``: settings the checkpoint must hold with these values. ``defaults``: name -> (this
    run's value, the value a checkpoint that does not record the name was made with).

    Everything is read and checked before anything is applied; any problem is one UserError line.
    """
    fix = "resume from another checkpoint-N, or train from the start in a new output_dir"
    if (path / "optimizer.pt").exists() and not (path / "optimizer.json").exists():
        raise UserError(f"checkpoint '{path}' is in the old pickle format (optimizer.pt), which difflora does "
                        f"not load because unpickling a file can run code; {fix}")
    try:
        state = _check_state_json(_read_json(path / "state.json"))
    except _Malformed as err:
        raise UserError(f"cannot resume from checkpoint '{path}': {err}; {fix}") from None
    checks = {key: (value, state.get(key)) for key, value in expect.items()}
    checks.update({key: (value, state.get(key, default)) for key, (value, default) in (defaults or {}).items()})
    for key, (value, theirs) in checks.items():
        if theirs != value:
            raise UserError(f"checkpoint '{path}' was made with {key}={theirs!r}, this run has "
                            f"{value!r}; resume with the same settings or start a new output_dir")
    try:
        weights = _read_tensors(path / "weights.safetensors")
        if set(weights) != set(named_params):
            missing = sorted(set(named_params) ^ set(weights))[0]
            raise UserError(f"checkpoint '{path}' does not match this model (e.g. '{missing}'); "
                            "resume with the same base model, rank and targets")
        for name, p in named_params.items():
            w = weights[name]
            if w.shape != p.shape or not w.is_floating_point():
                raise _Malformed(f"weight '{name}' is {_kind(w)} of {w.dtype}, the model's has shape "
                                 f"{tuple(p.shape)}")
        bad = nonfinite(weights)
        if bad is not None:
            raise _Malformed(f"weight '{bad}' is NaN or infinite")
        optimizer_state = load_state(path, "optimizer")
        _check_optimizer_state(optimizer_state, optimizer)
        scheduler_state = load_state(path, "scheduler")
        _check_scheduler_state(scheduler_state, lr_scheduler)
        ema_state = None
        if ema is not None:
            ema_state = load_state(path, "ema")
            if not (isinstance(ema_state, dict) and "shadow_params" in ema_state):
                raise _Malformed("ema.json holds no EMA weights")
            _check_like(ema_state, ema.state_dict(), "ema", loose_none=False)
            if not all(t.is_floating_point() for t in ema_state["shadow_params"]):
                raise _Malformed("the EMA weights are not floating point")
    except _Malformed as err:
        raise UserError(f"cannot resume from checkpoint '{path}': {err}; {fix}") from None
    # Options missing from the file (e.g. added by a newer torch) keep this run's values.
    for group, live in zip(optimizer_state["param_groups"], optimizer.state_dict()["param_groups"]):
        for key, value in live.items():
            group.setdefault(key, value)
    with torch.no_grad():
        for name, p in named_params.items():
            p.copy_(weights[name])
    try:
        optimizer.load_state_dict(optimizer_state)
        lr_scheduler.load_state_dict(scheduler_state)
        if ema_state is not None:
            # Copied into the live shadow weights: they keep their device and dtype, bit for bit.
            with torch.no_grad():
                for live, saved in zip(ema.shadow_params, ema_state.pop("shadow_params")):
                    live.copy_(saved)
            ema.load_state_dict(ema_state)
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as err:
        raise UserError(f"cannot resume from checkpoint '{path}': its optimizer, scheduler or EMA state does not "
                        f"fit this run ({type(err).__name__}); {fix}") from None
    return state
