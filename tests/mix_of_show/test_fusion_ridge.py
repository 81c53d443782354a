"""Fusion's objective: ridge 0 keeps W0 where no concept looks, and the concept weighting is real."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from difflora.config import parse_config
from difflora.errors import UserError
from difflora.mix_of_show import fuse as fuse_mod
from difflora.mix_of_show.fusion import GramAccumulator, solve_lbfgs


def _concepts(rows: list[int], out_f: int = 6, in_f: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    targets = [base + torch.randn(out_f, 2, generator=g, dtype=torch.float64)
               @ torch.randn(2, in_f, generator=g, dtype=torch.float64) for _ in rows]
    inputs = [torch.randn(n, in_f, generator=g, dtype=torch.float64) for n in rows]
    return base, targets, inputs


def _acc(base, targets, inputs, weighting="equal", keep_rows=False) -> GramAccumulator:
    acc = GramAccumulator(base, weighting=weighting, keep_rows=keep_rows)
    for t, x in zip(targets, inputs):
        acc.begin(t)
        acc.add(x)
        acc.end()
    return acc


def test_ridge_zero_keeps_base_weight_on_inputs_no_concept_excites():
    # Text-encoder-like: 3 concepts x 5 rows = 15 activation rows against 48 inputs.
    base, targets, inputs = _concepts([5, 5, 5], out_f=8, in_f=48, seed=1)
    w = _acc(base, targets, inputs).solve(ridge=0.0)
    seen = torch.linalg.qr(torch.cat(inputs).T).Q  # (in, 15): every direction a concept excites
    z = torch.randn(32, 48, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    unseen = z - (z @ seen) @ seen.T  # orthogonal to every recorded activation
    torch.testing.assert_close(unseen @ w.T, unseen @ base.T, rtol=1e-9, atol=1e-9)
    # ... and it still reproduces every concept on its own inputs (15 rows < 48: exactly).
    for x, t in zip(inputs, targets):
        torch.testing.assert_close(x @ w.T, x @ t.T, rtol=1e-8, atol=1e-8)
    assert max(_acc(base, targets, inputs).errors(w)) < 1e-12


def test_ridge_zero_with_full_rank_is_the_exact_normal_equation_solution():
    base, targets, inputs = _concepts([40, 60, 50], seed=3)
    acc = _acc(base, targets, inputs)
    assert acc.residual(acc.solve(ridge=0.0), ridge=0.0) < 1e-10


def test_ridge_zero_with_no_activation_energy_returns_the_base_weight():
    base, targets, _ = _concepts([4, 4])
    acc = _acc(base, targets, [torch.zeros(4, 16, dtype=torch.float64)] * 2)
    torch.testing.assert_close(acc.solve(ridge=0.0), base)


def test_weightings_differ_when_row_counts_differ():
    base, targets, inputs = _concepts([20, 400, 60], seed=4)
    equal = _acc(base, targets, inputs, "equal")
    rows = _acc(base, targets, inputs, "rows")
    w_equal, w_rows = equal.solve(ridge=0.0), rows.solve(ridge=0.0)
    assert float((w_equal - w_rows).norm() / w_equal.norm()) > 1e-3
    # Rows weighting favours the concept with most rows (index 1) and costs the smallest one (0).
    e_equal, e_rows = equal.errors(w_equal), equal.errors(w_rows)
    assert e_rows[1] < e_equal[1] and e_rows[0] > e_equal[0]
    # With equal row counts the two objectives are the same.
    base, targets, inputs = _concepts([50, 50, 50], seed=5)
    torch.testing.assert_close(_acc(base, targets, inputs, "equal").solve(0.0),
                               _acc(base, targets, inputs, "rows").solve(0.0), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("ridge", [0.0, 1e-2])
def test_rows_weighting_is_pooled_least_squares(ridge):
    base, targets, inputs = _concepts([20, 400, 60], seed=6)
    acc = _acc(base, targets, inputs, "rows")
    x = torch.cat(inputs)
    y = torch.cat([xi @ t.T for xi, t in zip(inputs, targets)])
    n, in_f = x.shape
    # min ||X W^T - Y||^2 / N + lam ||W - W0||^2, lam relative to the pooled mean input energy.
    lam = ridge * float(torch.trace(x.T @ x / n)) / in_f
    expect = torch.linalg.solve(x.T @ x / n + lam * torch.eye(in_f, dtype=torch.float64),
                                x.T @ y / n + lam * base.T).T
    torch.testing.assert_close(acc.solve(ridge), expect, rtol=1e-8, atol=1e-8)
    if ridge == 0.0:
        torch.testing.assert_close(acc.solve(ridge), torch.linalg.lstsq(x, y).solution.T, rtol=1e-8, atol=1e-8)


def test_lbfgs_minimises_the_selected_weighting():
    base, targets, inputs = _concepts([20, 400, 60], seed=7)
    acc = _acc(base.float(), [t.float() for t in targets], [x.float() for x in inputs], "rows", keep_rows=True)
    closed, lb = acc.solve(1e-4), solve_lbfgs(acc, steps=300, ridge=1e-4)
    assert float((lb - closed).norm() / closed.norm()) < 1e-3
    acc.weighting = "equal"
    assert float((lb - acc.solve(1e-4)).norm() / closed.norm()) > 1e-3


def test_fuse_config_offers_both_weightings_with_equal_default():
    from difflora.mix_of_show.fuse import FuseConfig

    common = ["--concepts", "c.yaml", "--pretrained_model_name_or_path", "m", "--output_dir", "o"]
    assert parse_config(FuseConfig, common).concept_weighting == "equal"
    assert parse_config(FuseConfig, [*common, "--concept_weighting", "rows"]).concept_weighting == "rows"
    with pytest.raises(UserError, match="concept_weighting"):
        parse_config(FuseConfig, [*common, "--concept_weighting", "tokens"])


@pytest.mark.parametrize("weighting", ["equal", "rows"])
def test_fuse_solves_with_the_configured_weighting(weighting):
    base, targets, inputs = _concepts([20, 400, 60], seed=8)
    acc = _acc(base, targets, inputs)  # recorded as fuse records: weighting not chosen yet
    key = "unet.layer"
    concepts = [SimpleNamespace(layers={key: None}) for _ in targets]
    weights = SimpleNamespace(base={key: base}, fused={}, set=lambda k, w: None,
                              merged=lambda c, k: targets[concepts.index(c)])
    cfg = SimpleNamespace(method="closed_form", ridge=0.0, concept_weighting=weighting, lbfgs_steps=1)
    fuse_mod._solve(weights, {key: acc}, cfg, concepts, "UNet", {})
    expect = _acc(base, targets, inputs, weighting).solve(0.0)
    torch.testing.assert_close(weights.fused[key], expect)
