"""Gradient fusion maths: one weight per layer that reproduces every concept on its own inputs.

For a layer with base weight ``W0`` and concepts ``i`` with merged weights ``W_i = W0 + dW_i`` and
input activations ``X_i`` (``n_i`` rows), fusion looks for

    W* = argmin_W  sum_i c_i ||X_i W^T - X_i W_i^T||^2 / n_i  +  lam ||W - W0||^2

with one of two concept weightings (``--concept_weighting``):

* ``equal`` (default): ``c_i = 1``, each concept's *mean* squared error. Every concept counts the
  same however many rows recorded it, so a concept with longer trigger words, more tokens per
  prompt or more prompt templates does not pull the fused weight its way.
* ``rows``: ``c_i = n_i / N`` (``N`` all rows), i.e. the squared error summed over all rows,
  the pooled least-squares problem of Mix-of-Show's own fusion (stack every concept's inputs and
  targets). A concept with more rows weighs more. Scaling the whole sum by ``1/N`` changes nothing
  but keeps ``lam`` comparable between the two.

It is linear least squares, so only the ``in x in`` Gram matrices ``G_i = X_i^T X_i / n_i`` matter:

    W* (sum_i c_i G_i + lam I) = sum_i c_i W_i G_i + lam W0

This closed form is RegMean's merging formula (Jin et al., "Dataless Knowledge Fusion by Merging
Weights of Language Models", ICLR 2023) applied to Mix-of-Show's objective, with a ridge toward
``W0``. :class:`GramAccumulator` streams activation batches into the Grams in float64, so memory
does not grow with the number of rows, and :meth:`GramAccumulator.solve` solves for the *change*
``D = W - W0``:

    D (sum_i c_i G_i + lam I) = sum_i c_i (W_i - W0) G_i

With ``ridge > 0`` this is one Cholesky solve and the same ``W*``. With ``ridge = 0`` and fewer
independent input directions than inputs (every text-encoder layer: a few prompts' tokens against
768 inputs) the system is singular; the minimum-norm ``D`` then leaves ``W0`` untouched in every
input direction no concept excites, where the minimum-norm ``W`` would zero ``W0`` there.
``lam`` is relative: ``ridge * trace(sum_i c_i G_i) / in``, so the same ``ridge`` means the same
thing for every layer.

:func:`solve_lbfgs` is the iterative method Mix-of-Show ships (stored activations, LBFGS from
``W0``), kept for comparison; :func:`average_weight` is naive delta averaging.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

Weighting = Literal["equal", "rows"]
WEIGHTINGS: tuple[str, ...] = ("equal", "rows")
# Eigenvalues of the Gram below this fraction of the largest count as "not excited" when ridge is
# 0: far above float64 round-off of a singular Gram, far below any direction that shapes outputs.
RANK_RTOL = 1e-10
DEFAULT_RIDGE = 1e-4


def layer_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows a layer multiplies by ``weight.flatten(1).T``: its input as a (rows, in) matrix.

    Linear: all leading dims flattened. Conv2d: the unfolded patches (a 1x1 conv is a per-pixel
    linear map), so a conv layer fuses like a linear one on ``weight.flatten(1)``.
    """
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise ValueError("grouped convolutions are not supported by fusion")
        if module.kernel_size == (1, 1) and module.stride == (1, 1) and module.padding in ((0, 0), 0):
            return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        padding = module.padding if not isinstance(module.padding, str) else 0
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


class GramAccumulator:
    """Streamed normal-equation terms of one layer for any number of concepts.

    Call :meth:`begin` with a concept's merged weight, :meth:`add` with its activation batches,
    :meth:`end`; then :meth:`solve`. Everything is float64 on ``device``. ``weighting`` picks the
    objective (module docstring); it may be changed before solving, the recorded Grams serve both.
    """

    def __init__(self, base_weight: torch.Tensor, device: str | torch.device = "cpu", keep_rows: bool = False,
                 weighting: Weighting = "equal"):
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        self.base = base_weight.detach().flatten(1).to(device=device, dtype=torch.float64)
        self.device = device
        self.weighting: Weighting = weighting
        self.concept_grams: list[torch.Tensor] = []  # G_i = X_i^T X_i / n_i
        self.counts: list[int] = []  # n_i
        self.targets: list[torch.Tensor] = []  # W_i
        self.keep_rows = keep_rows
        self.rows: list[list[torch.Tensor]] = []  # only for LBFGS (which needs raw activations)
        self._g: torch.Tensor | None = None
        self._n = 0
        self._sums: tuple[tuple[int, str], torch.Tensor, torch.Tensor] | None = None

    def begin(self, target_weight: torch.Tensor) -> None:
        """Start a concept whose layer computes ``target_weight`` (``W0 + scale * dW``)."""
        self._w = target_weight.detach().flatten(1).to(device=self.device, dtype=torch.float64)
        in_f = self.base.shape[1]
        self._g = torch.zeros(in_f, in_f, dtype=torch.float64, device=self.device)
        self._n = 0
        if self.keep_rows:
            self.rows.append([])

    def add(self, rows: torch.Tensor) -> None:
        """Fold a (rows, in) batch of this concept's inputs into its Gram."""
        x = rows.detach().to(device=self.device, dtype=torch.float64)
        self._g.addmm_(x.T, x)
        self._n += x.shape[0]
        if self.keep_rows:
            self.rows[-1].append(rows.detach().float().cpu())

    def end(self) -> None:
        if self._g is None:
            raise RuntimeError("end() without begin()")
        if self._n == 0:
            raise ValueError("no activations were recorded for this concept")
        self.concept_grams.append(self._g / self._n)
        self.counts.append(self._n)
        self.targets.append(self._w)
        self._g = None

    @property
    def num_concepts(self) -> int:
        return len(self.targets)

    def concept_weights(self) -> list[float]:
        """``c_i`` of the objective: 1 each (``equal``) or ``n_i / N`` (``rows``)."""
        if self.weighting == "equal":
            return [1.0] * len(self.counts)
        total = sum(self.counts)
        return [n / total for n in self.counts]

    def _normal_sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        key = (len(self.targets), self.weighting)
        if self._sums is None or self._sums[0] != key:
            gram = torch.zeros_like(self.concept_grams[0]) if self.concept_grams else None
            cross = torch.zeros_like(self.base)
            for c, g, t in zip(self.concept_weights(), self.concept_grams, self.targets):
                gram = gram + c * g
                cross = cross + c * (t @ g)
            if gram is None:
                raise ValueError("no concept was recorded for this layer")
            self._sums = (key, gram, cross)
        return self._sums[1], self._sums[2]

    @property
    def gram(self) -> torch.Tensor:
        """``sum_i c_i G_i`` (in x in)."""
        return self._normal_sums()[0]

    @property
    def cross(self) -> torch.Tensor:
        """``sum_i c_i W_i G_i`` (out x in)."""
        return self._normal_sums()[1]

    def ridge_lambda(self, ridge: float) -> float:
        return float(ridge * torch.trace(self.gram) / self.gram.shape[0]) if ridge > 0 else 0.0

    def solve(self, ridge: float = DEFAULT_RIDGE) -> torch.Tensor:
        """Closed-form W* (float64, shape of ``weight.flatten(1)``), solved as ``W0 + D``.

        With ``ridge = 0`` ``D`` is the minimum-norm solution, restricted to the input directions
        the concepts excite (Gram eigenvalues above ``RANK_RTOL`` of the largest): on any input
        orthogonal to every recorded activation the fused layer computes exactly what ``W0`` did.
        """
        gram, cross = self._normal_sums()
        lam = self.ridge_lambda(ridge)
        rhs = (cross - self.base @ gram).T  # (in, out): sum_i c_i G_i (W_i - W0)^T
        if lam > 0:
            a = gram + lam * torch.eye(gram.shape[0], dtype=torch.float64, device=self.device)
            chol, info = torch.linalg.cholesky_ex(a)
            if int(info) == 0:
                return self.base + torch.cholesky_solve(rhs, chol).T
        evals, evecs = torch.linalg.eigh(gram)
        keep = evals > RANK_RTOL * evals.max().clamp_min(0)
        if not bool(keep.any()):  # no concept excited this layer at all
            return self.base.clone()
        v = evecs[:, keep]
        delta = v @ ((v.T @ rhs) / evals[keep].unsqueeze(1))
        return self.base + delta.T

    def errors(self, weight: torch.Tensor) -> list[float]:
        """Per-concept relative error ``||X_i (W - W_i)^T||^2 / ||X_i (W_i - W0)^T||^2`` from the Grams.

        1 means "no better than the base weight", 0 reproduces the concept exactly. It does not
        depend on the weighting.
        """
        w = weight.detach().flatten(1).to(device=self.device, dtype=torch.float64)
        out = []
        for g, t in zip(self.concept_grams, self.targets):
            num = torch.einsum("oi,ij,oj->", w - t, g, w - t)
            den = torch.einsum("oi,ij,oj->", t - self.base, g, t - self.base)
            out.append(float(num / den.clamp_min(1e-30)))
        return out

    def objective(self, weight: torch.Tensor, ridge: float = DEFAULT_RIDGE) -> float:
        """The fusion loss at ``weight`` under the current weighting (what both solvers minimise)."""
        w = weight.detach().flatten(1).to(device=self.device, dtype=torch.float64)
        loss = sum(c * torch.einsum("oi,ij,oj->", w - t, g, w - t)
                   for c, g, t in zip(self.concept_weights(), self.concept_grams, self.targets))
        return float(loss + self.ridge_lambda(ridge) * ((w - self.base) ** 2).sum())

    def residual(self, weight: torch.Tensor, ridge: float = DEFAULT_RIDGE) -> float:
        """Relative residual of the normal equations at ``weight`` (0 at the exact solution)."""
        w = weight.detach().flatten(1).to(device=self.device, dtype=torch.float64)
        lam = self.ridge_lambda(ridge)
        lhs = w @ self.gram + lam * w
        rhs = self.cross + lam * self.base
        return float(torch.linalg.norm(lhs - rhs) / torch.linalg.norm(rhs).clamp_min(1e-30))


def solve_lbfgs(
    acc: GramAccumulator, steps: int = 500, ridge: float = DEFAULT_RIDGE, lr: float = 1.0, tol: float = 1e-9
) -> torch.Tensor:
    """Mix-of-Show's iterative fusion: LBFGS from ``W0`` on the stored activations (float32).

    Needs ``keep_rows=True``: memory grows with the number of rows, which is why the closed form
    exists. Same objective (weighting and ridge) as :meth:`GramAccumulator.solve`.
    """
    if not acc.keep_rows:
        raise ValueError("LBFGS needs the activations: build the accumulator with keep_rows=True")
    base = acc.base.float()
    xs = [torch.cat(r).to(base.device) for r in acc.rows]
    ys = [x @ t.float().T for x, t in zip(xs, acc.targets)]
    lam = acc.ridge_lambda(ridge)
    weights = acc.concept_weights()
    w = base.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w], lr=lr, max_iter=steps, tolerance_grad=tol, tolerance_change=tol * 1e-3,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = sum(c * ((x @ w.T - y) ** 2).sum() / x.shape[0] for c, x, y in zip(weights, xs, ys))
        loss = loss + lam * ((w - base) ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().double()


def average_weight(base: torch.Tensor, targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Naive merging: ``W0 + mean_i dW_i`` (what averaging LoRA deltas gives)."""
    base = base.detach().flatten(1).double()
    return base + sum(t.detach().flatten(1).double() - base for t in targets) / len(targets)
