"""ScaledSGD: torch's SGD on Riemannian-preconditioned LoRA gradients (scaled GD)."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.sgd import sgd

from difflora.optim.base import NamedParams, PreconditionedOptimizer, check_reg, use_foreach
from difflora.optim.preconditioner import DEFAULT_REG


class ScaledSGD(PreconditionedOptimizer):
    """Scaled gradient descent for LoRA: SGD on ``(B^T B + reg I)^-1 g_A`` and ``g_B (A A^T + reg I)^-1``.

    With ``reg = 0`` this is the scaled GD of low-rank matrix factorisation (Tong, Ma & Chi 2021):
    its convergence does not depend on the condition number, and the update of ``B @ A`` does not
    depend on how the product is split between the factors.

    Everything after the preconditioning is exactly ``torch.optim.SGD`` (it calls torch's
    functional ``sgd``): momentum, dampening, nesterov, and weight decay added to the
    *preconditioned* gradient, ``d_p = g~ + weight_decay * p`` -- SGD run on ``g~``. (Decaying
    before preconditioning would shrink the factors by a rank-dependent, non-isotropic amount.)
    Non-LoRA parameters get plain SGD. ``.grad`` is never modified. State: ``momentum_buffer``
    per parameter when ``momentum != 0``, like torch.

    Args:
        params: ``model.named_parameters()`` or groups whose ``params`` are ``(name, parameter)``
            pairs; frozen parameters are dropped. A pair may span two groups.
        reg: damping of the ``r x r`` Gram matrices, per group (see ``ScaledAdamW`` and ``DEFAULT_REG``).
        flatten: one contiguous buffer per bucket of same-shaped factors (see ``ScaledAdamW``).
    """

    def __init__(
        self,
        params: NamedParams,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        reg: float = DEFAULT_REG,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        flatten: bool = True,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"lr, momentum and weight_decay must be >= 0, got {lr}, {momentum}, {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                        weight_decay=weight_decay, reg=check_reg(reg), maximize=maximize, foreach=foreach)
        super().__init__(params, defaults, flatten=flatten)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        """One SGD step on preconditioned gradients; returns ``closure()``'s loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scaled = self._grads_for_step()
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("ScaledSGD does not support sparse gradients")
                params.append(p)
                grads.append(scaled.get(id(p), p.grad))
                if group["momentum"] != 0:
                    bufs.append(self.state[p].get("momentum_buffer"))
            if not params:
                continue
            sgd(
                params, grads, bufs,
                foreach=use_foreach(group["foreach"], params),
                weight_decay=group["weight_decay"], momentum=group["momentum"], lr=group["lr"],
                dampening=group["dampening"], nesterov=group["nesterov"], maximize=group["maximize"],
            )
            if group["momentum"] != 0:
                for p, buf in zip(params, bufs):
                    self.state[p]["momentum_buffer"] = buf
        return loss
