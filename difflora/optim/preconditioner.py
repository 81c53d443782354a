"""Batched ``r x r`` preconditioners of Riemannian-preconditioned LoRA.

For a pair ``(A: r x in, B: out x r)`` with gradients ``g_A``, ``g_B``::

    g~_A = (B^T B + reg_A I_r)^-1 g_A        g~_B = g_B (A A^T + reg_B I_r)^-1

Why batched: an SD1.5 UNet carries hundreds of LoRA pairs, but only a handful of distinct
shapes. Pairs with the same factor shapes, dtype and device are stacked and every Gram matrix,
Cholesky factorisation and product of a bucket is one batched call, so the cost is a few kernel
launches per shape instead of a Python loop per factor.

Numerics:

* the Gram matrices and the solves run in float32 (float64 stays float64); fp16/bf16 factors are
  upcast and the preconditioned gradient is cast back to the gradient's dtype;
* the damped Gram matrix is inverted through its Cholesky factor (``cholesky_ex``, no exception
  and no host sync per matrix). Where it is not positive definite -- ``reg = 0`` with ``B = 0`` at
  peft's initialisation, or a rank-deficient factor -- the Moore-Penrose pseudo-inverse
  (``pinv(hermitian=True)``) is used instead: the minimum-norm solution, which is ``0`` for a zero
  Gram matrix (where ``g_A = B^T (...)`` is zero as well). There is no silent identity fallback.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

#: Default damping of the ``r x r`` Gram matrices, chosen with benchmarks/matrix_factorization.py
#: (50x50 rank-4 target, singular values 1..1/kappa, LoRA init B = 0; results in
#: benchmarks/results/matrix_factorization.md). Scaled GD needs reg far below the smallest Gram
#: eigenvalue the factors must learn: at kappa = 1000 it takes 13 iterations with reg 0, 26 with 1e-6,
#: 1289 with 1e-4 and never converges with 1e-2 (peft's default), which turns it back into slow
#: plain GD. Scaled Adam needs reg > 0: with reg 0 the B ~ 0 start amplifies g_A without bound
#: (15723 iterations at kappa = 100), with 1e-6 .. 1e-2 it takes ~170-190. 1e-6 is the smallest
#: value good for both (it is also the paper's GPT-2 value). reg is in units of the factors' Gram
#: eigenvalues; for SD LoRA those are ~1e-3 .. 0.3 (A's rows have norm^2 ~ 1/3 at init, B^T B
#: grows from 0), the same range as the benchmark. Later sweeps on real runs may revise it.
DEFAULT_REG: float = 1e-6


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the preconditioner is computed in: float64 stays, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def damped_inverse(gram: Tensor, reg: float | Tensor) -> Tensor:
    """``(gram + reg I)^-1`` for a batch ``(n, r, r)`` of symmetric PSD matrices (``gram`` is modified).

    ``reg`` is a float or a tensor of shape ``(n,)``. Cholesky first; the pseudo-inverse for the
    matrices whose factorisation failed.
    """
    diag = gram.diagonal(dim1=-2, dim2=-1)
    if isinstance(reg, Tensor):
        diag.add_(reg.to(gram.dtype).unsqueeze(-1))
    elif reg != 0:
        diag.add_(reg)
    chol, info = torch.linalg.cholesky_ex(gram)
    bad = info != 0
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    inv = torch.cholesky_inverse(torch.where(bad[:, None, None], eye, chol))
    if bool(bad.any()):
        inv[bad] = torch.linalg.pinv(gram[bad], hermitian=True)
    return inv


# Buckets whose factors hold at most this many elements are stacked for batched matmuls.
_STACK_LIMIT = 1 << 20


def _grams(factors: list[Tensor], cdtype: torch.dtype, left: bool, stacked: bool) -> Tensor:
    """``F^T F`` (``left``) or ``F F^T`` for every factor, as one ``(n, r, r)`` tensor in ``cdtype``."""
    if stacked:
        f = torch.stack(factors).to(cdtype)
        return torch.bmm(f.transpose(1, 2), f) if left else torch.bmm(f, f.transpose(1, 2))
    r = factors[0].shape[1] if left else factors[0].shape[0]
    out = torch.empty(len(factors), r, r, dtype=cdtype, device=factors[0].device)
    for i, f in enumerate(factors):
        f = f.to(cdtype)
        torch.mm(f.T, f, out=out[i]) if left else torch.mm(f, f.T, out=out[i])
    return out


def _products(inv: Tensor, grads: list[Tensor], cdtype: torch.dtype, precondition_left: bool,
              stacked: bool) -> list[Tensor]:
    """``P_i g_i`` (``precondition_left``) or ``g_i P_i`` for every gradient, in the gradients' dtype."""
    dtype = grads[0].dtype
    if stacked:
        g = torch.stack(grads).to(cdtype)
        out = torch.bmm(inv, g) if precondition_left else torch.bmm(g, inv)
        return list(out.to(dtype).unbind(0))
    if precondition_left:
        return [torch.mm(p, g.to(cdtype)).to(dtype) for p, g in zip(inv.unbind(0), grads)]
    return [torch.mm(g.to(cdtype), p).to(dtype) for p, g in zip(inv.unbind(0), grads)]


def reg_values(values: list[float], device: torch.device) -> float | Tensor:
    first = values[0]
    if all(v == first for v in values):
        return float(first)
    return torch.tensor(values, dtype=torch.float64, device=device)


def bucket_pairs(a_params: Sequence[Tensor], b_params: Sequence[Tensor], a_grads: Sequence[Tensor | None],
             b_grads: Sequence[Tensor | None]) -> dict[tuple, list[int]]:
    """Pair indices grouped by (shapes, dtypes, device, which gradients are missing)."""
    out: dict[tuple, list[int]] = {}
    for k, (a, b) in enumerate(zip(a_params, b_params)):
        key = (a.shape, b.shape, a.dtype, b.dtype, a.device, a_grads[k] is None, b_grads[k] is None)
        out.setdefault(key, []).append(k)
    return out


def bucket_mode(a_shape: torch.Size, b_shape: torch.Size, a_dtype: torch.dtype, b_dtype: torch.dtype,
                 count: int) -> tuple[torch.dtype, bool]:
    """(compute dtype, stacked?) of a bucket. Small factors: stack the bucket and use batched
    matmuls (few kernel launches). Large factors: the stacking copies cost more than the
    launches, so loop over views instead."""
    cdtype = compute_dtype(a_dtype) if compute_dtype(a_dtype) == compute_dtype(b_dtype) else torch.float64
    r = a_shape[0]
    return cdtype, r * (a_shape.numel() // r + b_shape[0]) * count <= _STACK_LIMIT


def precondition_pairs(
    a_params: Sequence[Tensor],
    b_params: Sequence[Tensor],
    a_grads: Sequence[Tensor | None],
    b_grads: Sequence[Tensor | None],
    a_regs: Sequence[float],
    b_regs: Sequence[float],
) -> tuple[list[Tensor | None], list[Tensor | None]]:
    """Preconditioned gradients of every pair, from the factor values as they are now.

    ``a_regs[k]`` damps ``B^T B`` (the preconditioner of ``A``'s gradient), ``b_regs[k]`` damps
    ``A A^T``. A missing gradient (``None``) gives ``None``. Results have the shape and dtype of
    the gradients; they are new tensors (the ``.grad`` tensors are never written).
    """
    n = len(a_params)
    out_a: list[Tensor | None] = [None] * n
    out_b: list[Tensor | None] = [None] * n
    buckets = bucket_pairs(a_params, b_params, a_grads, b_grads)
    for (a_shape, b_shape, a_dtype, b_dtype, device, no_ga, no_gb), ks in buckets.items():
        if no_ga and no_gb:
            continue
        r = a_shape[0]
        count = len(ks)
        cdtype, stacked = bucket_mode(a_shape, b_shape, a_dtype, b_dtype, count)
        grams = []
        if not no_ga:  # P_A needs B^T B
            grams.append(_grams([b_params[k].reshape(b_shape[0], r) for k in ks], cdtype, left=True,
                                stacked=stacked))
        if not no_gb:  # P_B needs A A^T
            grams.append(_grams([a_params[k].reshape(r, -1) for k in ks], cdtype, left=False, stacked=stacked))
        regs: list[float] = []
        if not no_ga:
            regs += [a_regs[k] for k in ks]
        if not no_gb:
            regs += [b_regs[k] for k in ks]
        gram = grams[0] if len(grams) == 1 else torch.cat(grams)
        inv = damped_inverse(gram, reg_values(regs, device))
        if not no_ga:
            p_a = inv[:count]
            gas = [a_grads[k].reshape(r, -1) for k in ks]  # type: ignore[union-attr]
            for k, g in zip(ks, _products(p_a, gas, cdtype, precondition_left=True, stacked=stacked)):
                out_a[k] = g.view(a_shape)
        if not no_gb:
            p_b = inv[count:] if not no_ga else inv
            gbs = [b_grads[k].reshape(b_shape[0], r) for k in ks]  # type: ignore[union-attr]
            for k, g in zip(ks, _products(p_b, gbs, cdtype, precondition_left=False, stacked=stacked)):
                out_b[k] = g.view(b_shape)
    return out_a, out_b
