"""Fusion maths: normal equations, streaming, LBFGS agreement, better than averaging."""

from __future__ import annotations

import torch
from torch import nn

from difflora.mix_of_show.fusion import GramAccumulator, average_weight, layer_rows, solve_lbfgs


def _problem(n_concepts=3, out_f=12, in_f=16, rows=200, rank=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(out_f, in_f, generator=g)
    targets, inputs = [], []
    for i in range(n_concepts):
        delta = torch.randn(out_f, rank, generator=g) @ torch.randn(rank, in_f, generator=g) * 0.5
        targets.append(base + delta)
        # Each concept lives mostly in its own subspace of the input, as distinct prompts do.
        mix = torch.randn(in_f, in_f, generator=g) * 0.1
        mix[i * 4:(i + 1) * 4] += torch.randn(4, in_f, generator=g) * 2
        inputs.append(torch.randn(rows + 37 * i, in_f, generator=g) @ mix)
    return base, targets, inputs


def _accumulate(base, targets, inputs, chunk=None, keep_rows=False):
    acc = GramAccumulator(base, keep_rows=keep_rows)
    for t, x in zip(targets, inputs):
        acc.begin(t)
        for part in (x.split(chunk) if chunk else [x]):
            acc.add(part)
        acc.end()
    return acc


def test_normal_equations_hold_and_beat_average():
    base, targets, inputs = _problem()
    acc = _accumulate(base, targets, inputs)
    w = acc.solve(ridge=1e-4)
    assert acc.residual(w, ridge=1e-4) < 1e-10
    # By hand: W* (sum G_i + lam I) = sum W_i G_i + lam W0, with G_i = X_i^T X_i / n_i.
    grams = [x.double().T @ x.double() / x.shape[0] for x in inputs]
    lam = 1e-4 * float(torch.trace(sum(grams))) / base.shape[1]
    expect = (sum(t.double() @ g for t, g in zip(targets, grams)) + lam * base.double()) @ torch.linalg.inv(
        sum(grams) + lam * torch.eye(base.shape[1], dtype=torch.float64))
    torch.testing.assert_close(w, expect, rtol=1e-8, atol=1e-8)
    fused, avg = acc.errors(w), acc.errors(average_weight(base, targets))
    for i, x in enumerate(inputs):  # the Gram error equals the error measured on the rows
        direct = ((x.double() @ (w - targets[i].double()).T) ** 2).sum() / (
            (x.double() @ (targets[i] - base).double().T) ** 2).sum()
        assert abs(float(direct) - fused[i]) < 1e-8
    assert all(f < a for f, a in zip(fused, avg)), (fused, avg)
    assert sum(fused) < 0.5 * sum(avg)


def test_streamed_equals_all_at_once():
    base, targets, inputs = _problem(seed=1)
    once = _accumulate(base, targets, inputs).solve()
    streamed = _accumulate(base, targets, inputs, chunk=7).solve()
    torch.testing.assert_close(streamed, once, rtol=1e-10, atol=1e-10)


def test_lbfgs_converges_to_closed_form():
    base, targets, inputs = _problem(seed=2, rows=120)
    acc = _accumulate(base, targets, inputs, keep_rows=True)
    closed = acc.solve()
    lb = solve_lbfgs(acc, steps=500)
    # LBFGS runs in float32 on an ill-conditioned problem: close in weight, equal in objective.
    assert float((lb - closed).norm() / closed.norm()) < 1e-2
    f_closed, f_lb = acc.objective(closed), acc.objective(lb)
    assert f_closed <= f_lb * (1 + 1e-12)
    assert f_lb - f_closed < 1e-3 * f_closed


def test_single_concept_is_reproduced_exactly():
    base, targets, inputs = _problem(n_concepts=1, seed=3)
    acc = _accumulate(base, targets, inputs)
    torch.testing.assert_close(acc.solve(ridge=0.0), targets[0].double(), rtol=1e-6, atol=1e-6)


def test_conv_rows_match_conv_output():
    torch.manual_seed(0)
    for conv in (nn.Conv2d(3, 5, 3, padding=1), nn.Conv2d(3, 5, 1)):
        x = torch.randn(2, 3, 6, 6)
        rows = layer_rows(conv, x)
        y = rows @ conv.weight.flatten(1).T + conv.bias
        ref = conv(x).permute(0, 2, 3, 1).reshape(-1, 5)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
