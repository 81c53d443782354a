"""``build_optimizer``: one entry point for every optimizer the trainer can pick by name.

``named_params`` is ``model.named_parameters()`` (an iterable of ``(name, parameter)``) or a list
of group dicts whose ``params`` are such pairs, each group with its own options (``lr``, ...).
Frozen parameters are dropped. Options whose value is ``None`` mean "use the default"; an option
the chosen optimizer does not take is an error (a typo would otherwise go unnoticed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from difflora.optim.base import NamedParams
from difflora.optim.pairing import factor_role
from difflora.optim.scaled_adamw import ScaledAdamW
from difflora.optim.scaled_sgd import ScaledSGD

OPTIMIZER_NAMES: tuple[str, ...] = (
    "adamw", "scaled_adamw", "sgd", "scaled_sgd", "loraplus", "peft_riemannian", "adamw8bit",
)

_ADAMW_OPTIONS = {"lr", "betas", "eps", "weight_decay", "amsgrad"}
_SGD_OPTIONS = {"lr", "momentum", "dampening", "nesterov", "weight_decay"}
_OPTIONS: dict[str, set[str]] = {
    "adamw": _ADAMW_OPTIONS | {"foreach"},
    "scaled_adamw": _ADAMW_OPTIONS | {"reg", "foreach"},
    "sgd": _SGD_OPTIONS | {"foreach"},
    "scaled_sgd": _SGD_OPTIONS | {"reg", "foreach"},
    "loraplus": _ADAMW_OPTIONS | {"loraplus_lr_ratio"},
    "peft_riemannian": _ADAMW_OPTIONS | {"reg", "model"},
    "adamw8bit": {"lr", "betas", "eps", "weight_decay"},
}


def _groups(named_params: NamedParams) -> list[dict[str, Any]]:
    """Normalise to a list of groups of trainable ``(name, parameter)`` pairs."""
    items = list(named_params)
    if not items:
        raise ValueError("build_optimizer got an empty parameter list")
    groups = [dict(g) for g in items] if isinstance(items[0], dict) else [{"params": items}]
    for g in groups:
        pairs = list(g["params"])
        for item in pairs:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor)):
                raise ValueError("build_optimizer needs (name, parameter) pairs: pass model.named_parameters()")
        g["params"] = [(n, p) for n, p in pairs if p.requires_grad]
    if not any(g["params"] for g in groups):
        raise ValueError("build_optimizer got no trainable parameters (all have requires_grad=False)")
    return groups


def _plain(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Groups of plain tensors for optimizers that take no names."""
    return [{**g, "params": [p for _, p in g["params"]]} for g in groups]


def _loraplus_groups(groups: list[dict[str, Any]], lr: float, ratio: float) -> list[dict[str, Any]]:
    """Split each group: ``B`` factors (lora_B / lora_up / up) at ``ratio`` times the group's lr."""
    out = []
    for g in groups:
        base_lr = g.get("lr", lr)
        rest = [p for n, p in g["params"] if (factor_role(n) or ("",))[0] != "B"]
        ups = [p for n, p in g["params"] if (factor_role(n) or ("",))[0] == "B"]
        options = {k: v for k, v in g.items() if k != "params"}
        if rest:
            out.append({**options, "params": rest})
        if ups:
            out.append({**options, "params": ups, "lr": base_lr * ratio})
    return out


def _peft_riemannian(groups: list[dict[str, Any]], options: dict[str, Any]) -> torch.optim.Optimizer:
    model = options.pop("model", None)
    if model is None:
        raise ValueError("optimizer 'peft_riemannian' needs the model: build_optimizer(..., model=peft_model)")
    from peft.optimizers import create_riemannian_optimizer

    if any("lr" in g and g["lr"] != options.get("lr", g["lr"]) for g in groups):
        raise ValueError("optimizer 'peft_riemannian' takes one learning rate for all parameters; "
                         "use scaled_adamw for per-group rates")
    options.setdefault("lr", 1e-3)
    return create_riemannian_optimizer(model, torch.optim.AdamW, **options)


def _adamw8bit(groups: list[dict[str, Any]], options: dict[str, Any]) -> torch.optim.Optimizer:
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise ValueError("optimizer 'adamw8bit' needs bitsandbytes: pip install bitsandbytes "
                         f"(import failed: {err})") from None
    return bnb.optim.AdamW8bit(_plain(groups), **options)


def build_optimizer(name: str, named_params: NamedParams, **options: Any) -> torch.optim.Optimizer:
    """Build optimizer ``name`` (one of :data:`OPTIMIZER_NAMES`) over ``named_params``.

    ``loraplus`` is AdamW with LoRA+ rates built from the names (``B`` factors at
    ``lr * loraplus_lr_ratio``, default 16), so it works without a model.
    ``peft_riemannian`` is peft's ``create_riemannian_optimizer`` and needs ``model=``; it uses one
    learning rate for all of the model's trainable parameters. ``adamw8bit`` needs bitsandbytes.
    Raises ``ValueError`` for an unknown name, an option the optimizer does not take, or a
    missing requirement.
    """
    if name not in OPTIMIZER_NAMES:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZER_NAMES)}")
    options = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(options) - _OPTIONS[name])
    if unknown:
        raise ValueError(f"optimizer {name!r} does not take {', '.join(unknown)}; "
                         f"valid options: {', '.join(sorted(_OPTIONS[name]))}")
    if "betas" in options:
        options["betas"] = tuple(options["betas"])
    groups = _groups(named_params)
    builders: dict[str, Callable[[], torch.optim.Optimizer]] = {
        "adamw": lambda: torch.optim.AdamW(_plain(groups), **options),
        "sgd": lambda: torch.optim.SGD(_plain(groups), **{"lr": 1e-3, **options}),
        "scaled_adamw": lambda: ScaledAdamW(groups, **options),
        "scaled_sgd": lambda: ScaledSGD(groups, **options),
        "loraplus": lambda: torch.optim.AdamW(
            _loraplus_groups(groups, options.get("lr", 1e-3), options.pop("loraplus_lr_ratio", 16.0)),
            **options),
        "peft_riemannian": lambda: _peft_riemannian(groups, options),
        "adamw8bit": lambda: _adamw8bit(groups, options),
    }
    return builders[name]()
