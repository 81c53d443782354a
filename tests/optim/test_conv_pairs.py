"""Conv LoRA factors: A is a Conv2d weight (r, in, kh, kw), B is (out, r, 1, 1). Flattened to
(r, in*kh*kw) and (out, r) the preconditioner is the linear one; checked here against
``torch.linalg.solve`` on the flattened factors, for the batched (stacked) and per-pair paths."""

from __future__ import annotations

import pytest
import torch

from difflora.optim import ScaledAdamW, ScaledSGD
from difflora.optim import preconditioner as pc
from difflora.optim.pairing import pair_factors

REG = 0.05
SHAPES = {  # two 3x3 conv pairs of one shape (one bucket), a 1x1 conv pair, a linear pair, a plain tensor
    "res.conv1.lora_A.default.weight": (3, 5, 3, 3),
    "res.conv1.lora_B.default.weight": (6, 3, 1, 1),
    "res.conv2.lora_A.default.weight": (3, 5, 3, 3),
    "res.conv2.lora_B.default.weight": (6, 3, 1, 1),
    "proj_in.lora_A.default.weight": (2, 4, 1, 1),
    "proj_in.lora_B.default.weight": (4, 2, 1, 1),
    "to_q.lora_A.default.weight": (2, 7),
    "to_q.lora_B.default.weight": (5, 2),
    "res.conv1.lora_magnitude_vector.default.weight": (1, 6, 1, 1),
}
PAIRS = [(a, a.replace("lora_A", "lora_B")) for a in SHAPES if ".lora_A." in a]


def _params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for n, s in SHAPES.items()}


def _grads(params: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in params.items()}


def _solved(values: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The preconditioned gradients by hand: linear solves on the flattened factors."""
    out = dict(grads)
    for na, nb in PAIRS:
        a, b = values[na].detach(), values[nb].detach()
        r = a.shape[0]
        a2, b2 = a.reshape(r, -1), b.reshape(b.shape[0], r)
        eye = torch.eye(r, dtype=a.dtype)
        out[na] = torch.linalg.solve(b2.T @ b2 + REG * eye, grads[na].reshape(r, -1)).reshape(a.shape)
        # g_B (A A^T + reg I)^-1 = ((A A^T + reg I)^-1 g_B^T)^T: the Gram matrix is symmetric
        gb = grads[nb].reshape(b.shape[0], r)
        out[nb] = torch.linalg.solve(a2 @ a2.T + REG * eye, gb.T).T.reshape(b.shape)
    return out


@pytest.fixture(params=["stacked", "per_pair"])
def path(request, monkeypatch):
    """Both code paths of the preconditioner: batched matmuls, and a loop over views."""
    if request.param == "per_pair":
        monkeypatch.setattr(pc, "_STACK_LIMIT", 0)
    return request.param


def test_conv_factors_pair_by_name():
    params = _params()
    pairs = pair_factors([list(params)], [list(params.values())])
    names = {(p.name_a, p.name_b) for p in pairs}
    assert names == set(PAIRS)  # the magnitude vector is no factor


def test_precondition_pairs_matches_solve_on_flattened_factors(path):
    values = _params()
    grads = _grads(values, 1)
    a_names, b_names = [a for a, _ in PAIRS], [b for _, b in PAIRS]
    with torch.no_grad():  # as the optimizers call it
        new_a, new_b = pc.precondition_pairs([values[n] for n in a_names], [values[n] for n in b_names],
                                             [grads[n] for n in a_names], [grads[n] for n in b_names],
                                             [REG] * len(PAIRS), [REG] * len(PAIRS))
    expected = _solved(values, grads)
    for name, got in zip(a_names + b_names, new_a + new_b):
        assert got.shape == values[name].shape
        torch.testing.assert_close(got, expected[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_optimizers_step_conv_pairs_like_the_hand_computation(kind, path):
    """Three steps of ScaledSGD / ScaledAdamW (the cached plan included) against torch's SGD / AdamW
    run on hand-solved gradients; the DoRA-like magnitude gets the plain rule."""
    ours = _params()
    ref = {n: p.detach().clone().requires_grad_() for n, p in ours.items()}
    if kind == "sgd":
        opts = dict(lr=1e-2, momentum=0.9, weight_decay=1e-2)
        opt, ref_opt = ScaledSGD(list(ours.items()), reg=REG, **opts), torch.optim.SGD(list(ref.values()), **opts)
    else:
        opts = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-8, weight_decay=1e-2)
        opt = ScaledAdamW(list(ours.items()), reg=REG, **opts)
        ref_opt = torch.optim.AdamW(list(ref.values()), **opts)
    for step in range(3):
        grads = _grads(ours, 10 + step)
        hand = _solved(ref, grads)
        for n in ours:
            ours[n].grad = grads[n].clone()
            ref[n].grad = hand[n]
        for na, nb in PAIRS:  # the comparison can tell: preconditioning changes every factor's gradient
            assert not torch.allclose(hand[na], grads[na]) and not torch.allclose(hand[nb], grads[nb])
        opt.step()
        ref_opt.step()
        for n in ours:
            torch.testing.assert_close(ours[n], ref[n], rtol=1e-10, atol=1e-12, msg=f"{n} at step {step + 1}")
