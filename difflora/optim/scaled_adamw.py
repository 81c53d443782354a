"""ScaledAdamW: torch's AdamW on Riemannian-preconditioned LoRA gradients."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.adamw import adamw

from difflora.optim.base import NamedParams, PreconditionedOptimizer, check_reg, use_foreach
from difflora.optim.preconditioner import DEFAULT_REG


class ScaledAdamW(PreconditionedOptimizer):
    """AdamW whose moments are built from preconditioned LoRA gradients (Zhang & Pilanci, 2024).

    For each LoRA pair (paired by name, see :mod:`difflora.optim.pairing`) the gradients are
    replaced, before the moments, by ``(B^T B + reg I)^-1 g_A`` and ``g_B (A A^T + reg I)^-1``,
    computed from the factors before this step. Everything after that is exactly
    ``torch.optim.AdamW`` -- decoupled weight decay, bias correction, optional amsgrad -- and it
    is literally torch's functional ``adamw`` (multi-tensor or per-tensor kernels, see ``foreach``), so
    results match ``torch.optim.AdamW`` run on the preconditioned gradients. Parameters that are
    not LoRA factors get plain AdamW. ``.grad`` is never modified.

    State per parameter is AdamW's (``step``, ``exp_avg``, ``exp_avg_sq`` [, ``max_exp_avg_sq``]),
    in the parameter's dtype like torch; the preconditioner keeps nothing between steps. As with
    torch's AdamW, pure fp16 parameters need an ``eps`` that fp16 can hold (``1e-8`` underflows);
    mixed precision with fp32 master weights has no such issue.

    Args:
        params: ``model.named_parameters()`` or groups whose ``params`` are ``(name, parameter)``
            pairs; frozen parameters are dropped. A pair may span two groups (LoRA+ style rates).
        reg: damping of the ``r x r`` Gram matrices; per group. ``A``'s gradient uses the reg of
            ``A``'s group, ``B``'s gradient the reg of ``B``'s group. See ``DEFAULT_REG``.
        foreach: ``True`` torch's multi-tensor kernels, ``False`` a per-tensor loop; ``None``
            (default) picks: multi-tensor on accelerators, and on CPU only for small factors
            (see :func:`difflora.optim.base.use_foreach`).
    """

    def __init__(
        self,
        params: NamedParams,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        reg: float = DEFAULT_REG,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        reg=check_reg(reg), maximize=maximize, foreach=foreach)
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        """One AdamW step on preconditioned gradients; returns ``closure()``'s loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scaled = self._grads_for_step()
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("ScaledAdamW does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(scaled.get(p, p.grad))
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                if group["amsgrad"]:
                    max_exp_avg_sqs.append(state["max_exp_avg_sq"])
                steps.append(state["step"])
            if not params:
                continue
            beta1, beta2 = group["betas"]
            adamw(
                params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                foreach=use_foreach(group["foreach"], params),
                amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2, lr=group["lr"],
                weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
            )
        return loss
