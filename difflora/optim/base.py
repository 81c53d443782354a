"""What ScaledAdamW and ScaledSGD share: named parameter groups and preconditioned gradients.

The optimizers subclass ``torch.optim.Optimizer`` and keep plain tensors in
``param_groups[i]["params"]`` (so ``GradScaler.unscale_``, ``clip_grad_norm_`` and accelerate see
an ordinary optimizer) and the names beside them in ``param_groups[i]["param_names"]`` -- torch's
own key for named parameters -- so the pairing survives ``state_dict()`` / ``load_state_dict()``.
The pairing itself is not state: it is rebuilt from the names whenever the groups change.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from difflora.optim.pairing import FactorPair, pair_factors
from difflora.optim.plan import PreconditionPlan
from difflora.optim.preconditioner import precondition_pairs

NamedParams = Iterable[tuple[str, Tensor]] | Iterable[dict[str, Any]]


def _named_group(group: dict[str, Any]) -> dict[str, Any]:
    """Turn ``{"params": [(name, p), ...], ...}`` into ``params`` + ``param_names``, dropping frozen ones."""
    group = dict(group)
    raw = group["params"]
    if isinstance(raw, Tensor) or isinstance(raw, set):
        raise ValueError("scaled optimizers need named parameters: pass model.named_parameters() "
                         "or groups whose 'params' are (name, parameter) pairs")
    raw = list(raw)
    if "param_names" in group:  # already split, e.g. from load_state_dict or a torch-style group
        raw = list(zip(group["param_names"], raw))
    params, names = [], []
    for item in raw:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], Tensor)):
            raise ValueError("scaled optimizers need named parameters: pass model.named_parameters() "
                             f"or groups whose 'params' are (name, parameter) pairs, not {type(item).__name__}")
        name, p = item
        if p.requires_grad:
            names.append(str(name))
            params.append(p)
    group["params"], group["param_names"] = params, names
    return group


class PreconditionedOptimizer(torch.optim.Optimizer):
    """Base class: named groups, name-based pairing, and ``_grads_for_step``.

    Subclasses read gradients through :meth:`_grads_for_step` instead of ``p.grad``.
    """

    def __init__(self, params: NamedParams, defaults: dict[str, Any], flatten: bool = True) -> None:
        self.flatten = flatten  # see difflora.optim.plan: factors moved into one buffer per bucket
        groups = list(params)
        if not groups:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        groups = [_named_group(g) for g in groups]
        if not any(g["params"] for g in groups):
            raise ValueError("optimizer got no trainable parameters (all have requires_grad=False)")
        self._pairs: list[FactorPair] | None = None
        self._pairs_key: tuple | None = None
        self._plan: PreconditionPlan | None = None  # derived buffers, never in state_dict
        self._factor_lists: tuple | None = None  # (pairs, a_params, b_params, a_groups, b_groups)
        self._ready = False  # a pair may span groups: pair only once all groups are in
        super().__init__(groups, defaults)
        self._ready = True
        self._pairing()  # fail at construction on an unpaired factor

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(_named_group(param_group))
        self._pairs = None
        self._plan = None
        if getattr(self, "_ready", False):
            self._pairing()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._pairs = None
        self._plan = None

    def _pairing(self) -> list[FactorPair]:
        key = tuple(tuple(map(id, g["params"])) for g in self.param_groups)
        if self._pairs is None or key != self._pairs_key:
            names = []
            for g in self.param_groups:
                if "param_names" not in g or len(g["param_names"]) != len(g["params"]):
                    raise ValueError("a parameter group lost its 'param_names'; build the optimizer from "
                                     "model.named_parameters()")
                names.append(g["param_names"])
            self._pairs = pair_factors(names, [g["params"] for g in self.param_groups])
            self._pairs_key = key
        return self._pairs

    @torch.no_grad()
    def _grads_for_step(self) -> dict[int, Tensor]:
        """Preconditioned gradients of all LoRA factors, keyed by ``id(parameter)``.

        (Keyed by id: hashing a tensor goes through Python-level ``Tensor.__hash__``, which cost
        ~0.1 ms per step for an SD1.5 LoRA.)

        Computed for every pair from the parameter values before any update of this step.
        ``.grad`` itself is left untouched, so calling ``step()`` twice never preconditions twice.
        """
        pairs = self._pairing()
        if not pairs:
            return {}
        groups = self.param_groups
        cached = self._factor_lists
        if cached is None or cached[0] is not pairs:
            cached = (pairs,
                      [groups[p.a[0]]["params"][p.a[1]] for p in pairs],
                      [groups[p.b[0]]["params"][p.b[1]] for p in pairs],
                      [p.a[0] for p in pairs], [p.b[0] for p in pairs])
            self._factor_lists = cached
        _, a_params, b_params, a_groups, b_groups = cached
        a_grads = [p.grad for p in a_params]
        b_grads = [p.grad for p in b_params]
        sig = PreconditionPlan.signature_of(a_params, b_params, a_grads, b_grads)
        plan = self._plan
        if plan is None or plan.signature != sig or not plan.intact():
            plan = self._plan = PreconditionPlan(sig, a_params, b_params, a_grads, b_grads,
                                                 flatten=getattr(self, "flatten", True))
        a_regs = [groups[i]["reg"] for i in a_groups]
        b_regs = [groups[i]["reg"] for i in b_groups]
        if plan.uniform:
            new_a, new_b = plan.run(a_params, b_params, a_grads, b_grads, a_regs, b_regs)
        else:
            new_a, new_b = precondition_pairs(a_params, b_params, a_grads, b_grads, a_regs, b_regs)
        out: dict[int, Tensor] = {}
        for p, g in zip(a_params, new_a):
            if g is not None:
                out[id(p)] = g
        for p, g in zip(b_params, new_b):
            if g is not None:
                out[id(p)] = g
        return out


def check_reg(reg: float) -> float:
    """Validate ``reg`` (the damping of the ``r x r`` Gram matrices)."""
    if reg < 0:
        raise ValueError(f"reg must be >= 0, got {reg}")
    return float(reg)


# Mean elements per tensor below which torch's multi-tensor (``_foreach``) kernels beat a per-tensor
# loop on CPU: benchmarks/optimizer_overhead.py measured foreach 15% faster at SD1.5 rank 4
# (~3k elements per factor), even at rank 16 (~12k) and 35% slower at rank 64 (~50k).
FOREACH_MAX_MEAN_NUMEL = 16384


def use_foreach(choice: bool | None, params: list[Tensor]) -> bool:
    """The user's ``foreach`` if given; else multi-tensor kernels on accelerators, size-based on CPU."""
    if choice is not None:
        return choice
    if not params:
        return False
    if params[0].device.type != "cpu":
        return True
    return sum(p.numel() for p in params) / len(params) <= FOREACH_MAX_MEAN_NUMEL


# Device types whose torch build has the fused Adam(W) kernel.
_FUSED_DEVICES = ("cpu", "cuda", "mps", "xpu")


def use_fused(choice: bool | None, foreach: bool | None, params: list[Tensor]) -> bool:
    """The user's ``fused`` if given; else the fused kernel wherever torch has it, unless the user
    asked for ``foreach`` (one of the two, as in torch)."""
    if choice is not None:
        return choice
    if foreach is not None or not params:
        return False
    return all(p.device.type in _FUSED_DEVICES and p.dtype in (torch.float16, torch.bfloat16, torch.float32,
                                                                torch.float64) for p in params)
