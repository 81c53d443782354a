"""ScaledAdamW: torch's AdamW on Riemannian-preconditioned LoRA gradients."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.adamw import adamw

from difflora.optim.base import NamedParams, PreconditionedOptimizer, check_reg, use_foreach, use_fused
from difflora.optim.preconditioner import DEFAULT_REG, precondition_pairs

#: ``variant`` values: ``"torch"`` (default) is torch's AdamW on the preconditioned gradients;
#: ``"official"`` is the update of the paper's released Mix-of-Show ``AdamWr`` (an ablation).
VARIANTS: tuple[str, ...] = ("torch", "official")


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
            (default) leaves the choice to ``fused``, then picks multi-tensor on accelerators and,
            on CPU, only for small factors (see :func:`difflora.optim.base.use_foreach`).
        fused: ``True`` torch's fused AdamW kernel (one C++ call for all tensors of a group);
            ``None`` (default) uses it wherever torch has it for the parameters (CPU, CUDA, ...;
            floating dtypes) unless ``foreach`` is given. On CPU it is 3-4x faster than the
            multi-tensor path at SD LoRA sizes (benchmarks/optimizer_overhead.py); it computes the
            same formula, with rounding that may differ in the last bit.
        variant: ``"torch"`` (default): the above. ``"official"``: the update of ``AdamWr`` in the
            paper's released Mix-of-Show code, as that code runs it (its config never turns bias
            correction on), for ablations; per group, like ``lr``. It differs in three ways:

            * no Adam bias correction: ``p -= lr * m / (sqrt(v) + eps)``. Early steps are larger
              than torch's by ``1 / sqrt(1 - beta2^t)`` (31.6x at step 1 with ``beta2 = 0.999``)
              divided by ``1 / (1 - beta1^t)``;
            * ``eps`` is added to ``sqrt(v)`` itself, not to the bias-corrected ``sqrt(v_hat)``;
            * ``B``'s gradient is preconditioned with ``A`` *after* this step's update of ``A``
              (``A``'s with ``B`` before it, as in the default).

            Decoupled weight decay (``p *= 1 - lr * weight_decay`` before the Adam step) and the
            moments are as in torch. The released code's other quirks are not reproduced: its
            pairing by position, its ``torch.inverse`` with a fallback to the identity, ``reg = 0``
            (pass ``reg=0.0`` for that; a singular Gram matrix then takes the pseudo-inverse) and
            its default ``eps = 1e-6`` (pass it). Plain parameters get the same Adam rule, as in the
            released code's unpaired ``AdamWv``. ``amsgrad`` is not available with it.
        flatten: ``True`` (default) moves each bucket of same-shaped factors into one contiguous
            buffer at the first step (the parameters' ``.data`` become views; objects, values and
            shapes unchanged), so the preconditioner needs no stacking copies; ``False`` leaves
            the parameters' storage alone. Same results either way (see :mod:`difflora.optim.plan`).
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
        fused: bool | None = None,
        variant: str = "torch",
        flatten: bool = True,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        reg=check_reg(reg), maximize=maximize, foreach=foreach, fused=fused, variant=variant)
        super().__init__(params, defaults, flatten=flatten)
        for group in self.param_groups:
            _check_variant(group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
            group.setdefault("variant", "torch")

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        """One AdamW step on preconditioned gradients; returns ``closure()``'s loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            _check_variant(group)
        scaled = self._grads_for_step()
        late = self._late_factors()
        for group in self.param_groups:
            self._update_group(group, scaled, skip=late)
        if late:
            # "official": B's gradient preconditioned with its A as updated just above.
            _, a_params, b_params, a_groups, b_groups = self._factor_lists
            ks = [k for k, b in enumerate(b_params) if id(b) in late and b.grad is not None]
            groups = self.param_groups
            _, new_b = precondition_pairs([a_params[k] for k in ks], [b_params[k] for k in ks],
                                          [None] * len(ks), [b_params[k].grad for k in ks],
                                          [groups[a_groups[k]]["reg"] for k in ks],
                                          [groups[b_groups[k]]["reg"] for k in ks])
            rescaled = {id(b_params[k]): g for k, g in zip(ks, new_b)}
            for group in groups:
                self._update_group(group, rescaled, only=late)
        return loss

    def _late_factors(self) -> set[int]:
        """ids of the B factors whose group runs the "official" variant (updated after their A)."""
        if all(g["variant"] == "torch" for g in self.param_groups):
            return set()
        pairs = self._pairing()
        groups = self.param_groups
        return {id(groups[p.b[0]]["params"][p.b[1]]) for p in pairs if groups[p.b[0]]["variant"] == "official"}

    def _fused_for(self, group: dict[str, Any]) -> bool:
        """:func:`use_fused` for ``group``, remembered until its parameter list or choices change
        (checking every parameter's device and dtype each step cost ~0.2 ms for an SD1.5 LoRA)."""
        plist = group["params"]
        key = (id(plist), len(plist), group.get("fused"), group["foreach"])
        cache = self.__dict__.setdefault("_fused_cache", {})
        if key not in cache:
            cache[key] = use_fused(group.get("fused"), group["foreach"], plist)
        return cache[key]

    def _update_group(self, group: dict[str, Any], scaled: dict[int, Tensor],
                      skip: set[int] | frozenset[int] = frozenset(), only: set[int] | None = None) -> None:
        """The Adam update of ``group``'s parameters with a gradient (``scaled`` if there, else ``.grad``).

        ``scaled`` is keyed by ``id(parameter)``; ``skip``: ids left for later; ``only``: if given,
        the ids updated now.
        """
        fused = group["variant"] == "torch" and self._fused_for(group)
        grads = [p.grad for p in group["params"]]
        if fused and not skip and only is None:
            index, params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = self._cached_lists(group, grads)
        else:
            index, params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = self._collect(
                group, grads, fused, skip, only)
        if not params:
            return
        grads = [scaled.get(id(p), grads[i]) for i, p in zip(index, params)]
        beta1, beta2 = group["betas"]
        if group["variant"] == "official":
            _official_adam(params, grads, exp_avgs, exp_avg_sqs, steps, beta1=beta1, beta2=beta2,
                           lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
                           maximize=group["maximize"])
            return
        if fused:
            _fused_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, group)
            return
        adamw(
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
            foreach=use_foreach(group["foreach"], params),
            amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2, lr=group["lr"],
            weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
        )

    def _collect(self, group: dict[str, Any], grads: list[Tensor | None], fused: bool,
                 skip: set[int] | frozenset[int] = frozenset(), only: set[int] | None = None) -> tuple[list, ...]:
        """(positions in the group, parameters, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps) of the
        parameters updated now; creates missing state as torch's AdamW does."""
        index, params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], [], [], []
        state_of = self.state
        for i, (p, g) in enumerate(zip(group["params"], grads)):
            if g is None or (skip and id(p) in skip) or (only is not None and id(p) not in only):
                continue
            if g.is_sparse:
                raise RuntimeError("ScaledAdamW does not support sparse gradients")
            state = state_of[p]
            if len(state) == 0:
                # The fused kernel wants the step on the parameter's device (torch's AdamW does the same).
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if fused else "cpu")
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            index.append(i)
            params.append(p)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            if group["amsgrad"]:
                max_exp_avg_sqs.append(state["max_exp_avg_sq"])
            step = state["step"]
            if fused and step.device != p.device:  # e.g. a state saved by a non-fused run
                step = state["step"] = step.to(p.device)
            steps.append(step)
        return index, params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps

    def _cached_lists(self, group: dict[str, Any], grads: list[Tensor | None]) -> tuple[list, ...]:
        """:meth:`_collect` for the fused path, remembered between steps (rebuilding the lists cost
        ~0.3 ms per step for an SD1.5 LoRA). Valid while the group's parameter list, the state
        dict (``load_state_dict`` replaces it) and its size, and which gradients are present (with
        their dtypes and layouts) are unchanged. The entry holds the list and the dict, so their
        ids cannot be reused while it is kept."""
        present = tuple(None if g is None else (g.dtype, g.layout) for g in grads)
        cache = self.__dict__.setdefault("_lists_cache", {})
        hit = cache.get(id(group))
        if hit is not None and hit[0] == self._lists_key(group, present):
            return hit[2]
        lists = self._collect(group, grads, fused=True)
        cache[id(group)] = (self._lists_key(group, present), (group["params"], self.state), lists)
        return lists

    def _lists_key(self, group: dict[str, Any], present: tuple) -> tuple:
        return id(group["params"]), id(self.state), len(self.state), present, group["amsgrad"]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.__dict__.pop("_lists_cache", None)  # the cached lists hold the old state's tensors


_ONE = torch.tensor(1.0)


def _fused_adamw(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                 max_exp_avg_sqs: list[Tensor], steps: list[Tensor], group: dict[str, Any]) -> None:
    """torch's fused AdamW kernel, called as ``torch.optim.AdamW(fused=True)`` calls it.

    Called directly for one reason: the functional wrapper bumps the step counters with
    ``_foreach_add_(steps, 1)``, which on CPU wraps the ``1`` into a new tensor per parameter
    (~1 ms per step for the 352 factors of an SD1.5 LoRA); adding one shared CPU tensor is the
    overload torch's own multi-tensor Adam uses for CPU steps. Same arithmetic either way.
    """
    beta1, beta2 = group["betas"]
    buckets: dict[tuple, list[int]] = {}
    for i, (p, g, s) in enumerate(zip(params, grads, steps)):
        buckets.setdefault((p.device, p.dtype, g.dtype, s.device), []).append(i)
    for (_, _, _, step_device), idx in buckets.items():
        if len(buckets) == 1:
            ps, gs, ms, vs, ss = params, grads, exp_avgs, exp_avg_sqs, steps
            mvs = max_exp_avg_sqs
        else:
            ps, gs, ms, vs, ss = ([t[i] for i in idx] for t in (params, grads, exp_avgs, exp_avg_sqs, steps))
            mvs = [max_exp_avg_sqs[i] for i in idx] if max_exp_avg_sqs else []
        if step_device.type == "cpu":
            torch._foreach_add_(ss, _ONE, alpha=1.0)
        else:
            torch._foreach_add_(ss, 1)
        torch._fused_adamw_(ps, gs, ms, vs, mvs, ss, amsgrad=group["amsgrad"], lr=group["lr"], beta1=beta1,
                            beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
                            maximize=group["maximize"], grad_scale=None, found_inf=None)


def _check_variant(group: dict[str, Any]) -> None:
    variant = group.get("variant", "torch")
    if variant not in VARIANTS:
        raise ValueError(f"unknown ScaledAdamW variant {variant!r}; valid: {', '.join(VARIANTS)}")
    if variant == "official" and group["amsgrad"]:
        raise ValueError("ScaledAdamW variant 'official' has no amsgrad; use variant='torch' for amsgrad")


def _official_adam(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                   steps: list[Tensor], *, beta1: float, beta2: float, lr: float, weight_decay: float, eps: float,
                   maximize: bool) -> None:
    """Adam without bias correction, ``eps`` added to ``sqrt(v)``; decoupled decay first (in place)."""
    for p, g, m, v, t in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        g = -g if maximize else g
        t += 1
        if weight_decay:
            p.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        p.addcdiv_(m, v.sqrt().add_(eps), value=-lr)
