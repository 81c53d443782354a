"""Gradient fusion maths: one weight per layer that reproduces every concept on its own inputs.

For a layer with base weight ``W0`` and concepts ``i`` with merged weights ``W_i = W0 + dW_i`` and
input activations ``X_i`` (rows), Mix-of-Show looks for

    W* = argmin_W  sum_i ||X_i W^T - X_i W_i^T||^2 / n_i  +  lam ||W - W0||^2

It is linear least squares, so only the ``in x in`` Gram matrices ``G_i = X_i^T X_i / n_i`` matter:

    W* (sum_i G_i + lam I) = sum_i W_i G_i + lam W0

:class:`GramAccumulator` streams activation batches into those sums in float64, so memory is
``O(in^2 + out * in)`` however many rows are seen, and :meth:`GramAccumulator.solve` does one
Cholesky solve. Each concept is normalised by its own row count (``n_i``) so a concept sampled
with more steps or prompts does not outweigh the others. ``lam`` is relative: ``ridge *
trace(sum_i G_i) / in``, so the same ``ridge`` means the same thing for every layer.

:func:`solve_lbfgs` is the iterative method Mix-of-Show ships (stored activations, LBFGS from
``W0``), kept for comparison; :func:`average_weight` is naive delta averaging.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

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
    """Streamed normal-equation sums of one layer for any number of concepts.

    Call :meth:`begin` with a concept's merged weight, :meth:`add` with its activation batches,
    :meth:`end`; then :meth:`solve`. Everything is float64 on ``device``.
    """

    def __init__(self, base_weight: torch.Tensor, device: str | torch.device = "cpu", keep_rows: bool = False):
        self.base = base_weight.detach().flatten(1).to(device=device, dtype=torch.float64)
        out_f, in_f = self.base.shape
        self.device = device
        self.gram = torch.zeros(in_f, in_f, dtype=torch.float64, device=device)  # sum_i G_i
        self.cross = torch.zeros(out_f, in_f, dtype=torch.float64, device=device)  # sum_i W_i G_i
        self.concept_grams: list[torch.Tensor] = []  # kept per concept for error reports only
        self.targets: list[torch.Tensor] = []
        self.keep_rows = keep_rows
        self.rows: list[list[torch.Tensor]] = []  # only for LBFGS (which needs raw activations)
        self._g: torch.Tensor | None = None
        self._n = 0

    def begin(self, target_weight: torch.Tensor) -> None:
        """Start a concept whose layer computes ``target_weight`` (``W0 + scale * dW``)."""
        self._w = target_weight.detach().flatten(1).to(device=self.device, dtype=torch.float64)
        self._g = torch.zeros_like(self.gram)
        self._n = 0
        if self.keep_rows:
            self.rows.append([])

    def add(self, rows: torch.Tensor) -> None:
        """Fold a (rows, in) batch of this concept's inputs into the sums."""
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
        g = self._g / self._n
        self.gram += g
        self.cross += self._w @ g
        self.concept_grams.append(g)
        self.targets.append(self._w)
        self._g = None

    @property
    def num_concepts(self) -> int:
        return len(self.targets)

    def ridge_lambda(self, ridge: float) -> float:
        return float(ridge * torch.trace(self.gram) / self.gram.shape[0]) if ridge > 0 else 0.0

    def solve(self, ridge: float = DEFAULT_RIDGE) -> torch.Tensor:
        """Closed-form W* (float64, shape of ``weight.flatten(1)``) from the accumulated sums."""
        lam = self.ridge_lambda(ridge)
        a = self.gram + lam * torch.eye(self.gram.shape[0], dtype=torch.float64, device=self.device)
        rhs = (self.cross + lam * self.base).T  # (in, out)
        chol, info = torch.linalg.cholesky_ex(a)
        if int(info) == 0:
            return torch.cholesky_solve(rhs, chol).T
        # Rank-deficient inputs with ridge 0: the minimum-norm least-squares solution.
        return torch.linalg.lstsq(a, rhs).solution.T

    def errors(self, weight: torch.Tensor) -> list[float]:
        """Per-concept relative error ``||X_i (W - W_i)^T||^2 / ||X_i (W_i - W0)^T||^2`` from the Grams.

        1 means "no better than the base weight", 0 reproduces the concept exactly.
        """
        w = weight.detach().flatten(1).to(device=self.device, dtype=torch.float64)
        out = []
        for g, t in zip(self.concept_grams, self.targets):
            num = torch.einsum("oi,ij,oj->", w - t, g, w - t)
            den = torch.einsum("oi,ij,oj->", t - self.base, g, t - self.base)
            out.append(float(num / den.clamp_min(1e-30)))
        return out

    def objective(self, weight: torch.Tensor, ridge: float = DEFAULT_RIDGE) -> float:
        """The fusion loss at ``weight`` (what both solvers minimise)."""
        w = weight.detach().flatten(1).to(device=self.device, dtype=torch.float64)
        loss = sum(torch.einsum("oi,ij,oj->", w - t, g, w - t) for g, t in zip(self.concept_grams, self.targets))
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
    exists. Same objective (and ridge) as :meth:`GramAccumulator.solve`.
    """
    if not acc.keep_rows:
        raise ValueError("LBFGS needs the activations: build the accumulator with keep_rows=True")
    base = acc.base.float()
    xs = [torch.cat(r).to(base.device) for r in acc.rows]
    ys = [x @ t.float().T for x, t in zip(xs, acc.targets)]
    lam = acc.ridge_lambda(ridge)
    w = base.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w], lr=lr, max_iter=steps, tolerance_grad=tol, tolerance_change=tol * 1e-3,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = sum(((x @ w.T - y) ** 2).sum() / x.shape[0] for x, y in zip(xs, ys))
        loss = loss + lam * ((w - base) ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().double()


def average_weight(base: torch.Tensor, targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Naive merging: ``W0 + mean_i dW_i`` (what averaging LoRA deltas gives)."""
    base = base.detach().flatten(1).double()
    return base + sum(t.detach().flatten(1).double() - base for t in targets) / len(targets)
