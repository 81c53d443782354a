"""ScaledAdamW(variant="official"): the released Mix-of-Show AdamWr update, checked by hand."""

from __future__ import annotations

import pytest
import torch

from difflora.optim import ScaledAdamW


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"q.lora_A.default.weight": (3, 8), "q.lora_B.default.weight": (6, 3), "emb.weight": (4, 5)}
    return {n: torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for n, s in shapes.items()}


def _hand_official(values, grads_per_step, lr, betas, eps, wd, reg):
    """The official update written out: A first (P_A from B before the step), then B (P_B from the new A)."""
    b1, b2 = betas
    v = {n: t.clone() for n, t in values.items()}
    m = {n: torch.zeros_like(t) for n, t in v.items()}
    s = {n: torch.zeros_like(t) for n, t in v.items()}
    eye = torch.eye(3, dtype=torch.float64)

    def adam(n, g):
        m[n] = b1 * m[n] + (1 - b1) * g
        s[n] = b2 * s[n] + (1 - b2) * g * g
        v[n] = v[n] * (1 - lr * wd) - lr * m[n] / (s[n].sqrt() + eps)  # no bias correction, eps on sqrt(v)

    for grads in grads_per_step:
        a, b = "q.lora_A.default.weight", "q.lora_B.default.weight"
        adam(a, torch.linalg.inv(v[b].T @ v[b] + reg * eye) @ grads[a])
        adam("emb.weight", grads["emb.weight"])
        adam(b, grads[b] @ torch.linalg.inv(v[a] @ v[a].T + reg * eye))  # A already updated
    return v


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_official_variant_matches_hand_computation(wd):
    lr, betas, eps, reg = 1e-2, (0.9, 0.999), 1e-6, 0.05
    params = _params()
    start = {n: p.detach().clone() for n, p in params.items()}
    opt = ScaledAdamW(list(params.items()), lr=lr, betas=betas, eps=eps, weight_decay=wd, reg=reg,
                      variant="official")
    gen = torch.Generator().manual_seed(1)
    history = []
    for _ in range(3):
        grads = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in params.items()}
        history.append(grads)
        for n, p in params.items():
            p.grad = grads[n].clone()
        opt.step()
        for n, p in params.items():
            assert torch.equal(p.grad, grads[n])  # .grad untouched
    expected = _hand_official(start, history, lr, betas, eps, wd, reg)
    for n, p in params.items():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-10, atol=1e-12, msg=n)


def test_official_step_one_is_larger_than_torch_by_the_missing_bias_correction():
    """Plain parameter, one step: torch moves lr * sign(g); the official update lr * 0.1 / sqrt(0.001)."""
    lr = 1e-3
    moved = {}
    for variant in ("torch", "official"):
        w = torch.ones(4, dtype=torch.float64, requires_grad=True)
        opt = ScaledAdamW([("w", w)], lr=lr, eps=0.0, weight_decay=0.0, variant=variant)
        w.grad = torch.full_like(w, 2.0)
        opt.step()
        moved[variant] = float(1.0 - w.detach()[0])
    assert moved["torch"] == pytest.approx(lr)
    assert moved["official"] == pytest.approx(lr * 0.1 / 0.001 ** 0.5)


def test_default_is_torch_and_the_variant_is_a_group_option():
    params = _params()
    opt = ScaledAdamW([{"params": list(params.items())[:2]},
                       {"params": list(params.items())[2:], "variant": "official"}], lr=1e-2)
    assert [g["variant"] for g in opt.param_groups] == ["torch", "official"]
    state = opt.state_dict()
    assert state["param_groups"][1]["variant"] == "official"


def test_bad_variant_and_amsgrad_are_refused():
    with pytest.raises(ValueError, match="variant"):
        ScaledAdamW(list(_params().items()), variant="paper")
    with pytest.raises(ValueError, match="amsgrad"):
        ScaledAdamW(list(_params().items()), variant="official", amsgrad=True)


def test_switching_a_group_to_official_before_the_first_step():
    """Setting group["variant"] after construction (as torch allows for lr) takes effect at the next step."""
    a, b = _params(), _params()
    opt_a = ScaledAdamW(list(a.items()), lr=1e-2, variant="official")
    opt_b = ScaledAdamW(list(b.items()), lr=1e-2)
    for g in opt_b.param_groups:
        g["variant"] = "official"
    for p, q in zip(a.values(), b.values()):
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
    opt_a.step()
    opt_b.step()
    for p, q in zip(a.values(), b.values()):
        assert torch.equal(p, q)
