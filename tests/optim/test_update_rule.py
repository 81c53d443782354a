"""The update rule, checked against explicit inverses and torch's own SGD / AdamW."""

from __future__ import annotations

import pytest
import torch

from difflora.optim import ScaledAdamW, ScaledSGD
from difflora.optim.base import use_foreach


def _model_params(dtype=torch.float64, seed=0):
    """Named tensors: a linear pair, a pair spanning both groups, a conv pair, and a plain embedding."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "q.lora_A.default.weight": (3, 10),
        "q.lora_B.default.weight": (7, 3),
        "k.lora_down.weight": (2, 6),
        "k.lora_up.weight": (5, 2),
        "conv.lora_A.default.weight": (2, 3, 3, 3),
        "conv.lora_B.default.weight": (4, 2, 1, 1),
        "text.token_embedding.weight": (6, 4),
    }
    return {n: torch.randn(s, generator=g, dtype=dtype).requires_grad_() for n, s in shapes.items()}


def _groups(params, reg0, reg1):
    names0 = ["q.lora_A.default.weight", "q.lora_B.default.weight", "k.lora_down.weight",
              "conv.lora_A.default.weight", "conv.lora_B.default.weight"]
    names1 = ["k.lora_up.weight", "text.token_embedding.weight"]
    return (
        [{"params": [(n, params[n]) for n in names0], "lr": 1e-2, "reg": reg0},
         {"params": [(n, params[n]) for n in names1], "lr": 3e-2, "reg": reg1, "weight_decay": 0.05}],
        names0, names1,
    )


PAIRS = [("q.lora_A.default.weight", "q.lora_B.default.weight"), ("k.lora_down.weight", "k.lora_up.weight"),
         ("conv.lora_A.default.weight", "conv.lora_B.default.weight")]


def _hand_preconditioned(values, grads, reg_of):
    """g~ by the paper's formulas with explicit inverses."""
    out = dict(grads)
    for na, nb in PAIRS:
        a, b = values[na], values[nb]
        r = a.shape[0]
        a2, b2 = a.reshape(r, -1), b.reshape(b.shape[0], r)
        eye = torch.eye(r, dtype=a.dtype)
        p_a = torch.linalg.inv(b2.T @ b2 + reg_of[na] * eye)
        p_b = torch.linalg.inv(a2 @ a2.T + reg_of[nb] * eye)
        out[na] = (p_a @ grads[na].reshape(r, -1)).reshape(a.shape)
        out[nb] = (grads[nb].reshape(b.shape[0], r) @ p_b).reshape(b.shape)
    return out


@pytest.mark.parametrize("foreach", [None, True, False])
@pytest.mark.parametrize("kind", ["sgd", "sgd_nesterov", "adamw", "adamw_amsgrad"])
def test_matches_hand_computation(kind, foreach):
    reg0, reg1 = 0.1, 0.5
    ours = _model_params()
    ref = {n: p.detach().clone().requires_grad_() for n, p in ours.items()}
    groups, names0, names1 = _groups(ours, reg0, reg1)
    ref_groups = [{**groups[0], "params": [ref[n] for n in names0]},
                  {**groups[1], "params": [ref[n] for n in names1]}]
    for g in ref_groups:
        g.pop("reg")
    if kind.startswith("sgd"):
        opts = dict(lr=1e-2, momentum=0.9, weight_decay=1e-2, nesterov=kind.endswith("nesterov"),
                    dampening=0.0 if kind.endswith("nesterov") else 0.1)
        opt, ref_opt = ScaledSGD(groups, **opts, foreach=foreach), torch.optim.SGD(ref_groups, **opts)
    else:
        opts = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-8, weight_decay=1e-2, amsgrad=kind.endswith("amsgrad"))
        opt, ref_opt = ScaledAdamW(groups, **opts, foreach=foreach), torch.optim.AdamW(ref_groups, **opts)
    reg_of = {n: reg0 for n in names0} | {n: reg1 for n in names1}
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        grads = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in ours.items()}
        for n in ours:
            ours[n].grad = grads[n].clone()
        tilde = _hand_preconditioned({n: p.detach() for n, p in ref.items()}, grads, reg_of)
        for n in ref:
            ref[n].grad = tilde[n]
        opt.step()
        ref_opt.step()
        for n in ours:
            torch.testing.assert_close(ours[n].detach(), ref[n].detach(), rtol=1e-10, atol=1e-12, msg=n)
            assert torch.equal(ours[n].grad, grads[n])  # .grad untouched


def test_default_is_torch_fused_adamw_on_the_preconditioned_gradients():
    """float32, default arguments: torch's fused AdamW (with the step on the parameter's device) fed
    the hand-preconditioned gradients, to float32 rounding of the preconditioner."""
    params = {n: p.detach().float().requires_grad_() for n, p in _model_params(torch.float32).items()}
    groups, names0, names1 = _groups(params, 0.1, 0.1)
    opt = ScaledAdamW(groups, lr=1e-2)
    for p in params.values():
        p.grad = torch.randn_like(p)
    values = {n: p.detach().clone() for n, p in params.items()}
    tilde = _hand_preconditioned(values, {n: p.grad for n, p in params.items()}, dict.fromkeys(params, 0.1))
    ref = {n: v.clone().requires_grad_() for n, v in values.items()}
    ref_opt = torch.optim.AdamW([{"params": [ref[n] for n in names0], "lr": 1e-2},
                                 {"params": [ref[n] for n in names1], "lr": 3e-2, "weight_decay": 0.05}],
                                lr=1e-2, fused=True)
    for n in ref:
        ref[n].grad = tilde[n]
    opt.step()
    ref_opt.step()
    assert all(opt.state[p]["step"].device == p.device for p in params.values())
    for n, p in params.items():
        torch.testing.assert_close(p.detach(), ref[n].detach(), rtol=1e-6, atol=1e-7, msg=n)


def test_foreach_default_follows_tensor_size_on_cpu():
    small = [torch.zeros(4, 320), torch.zeros(320, 4)]
    large = [torch.zeros(64, 1280), torch.zeros(1280, 64)]
    assert use_foreach(None, small) and not use_foreach(None, large)
    assert use_foreach(True, large) and not use_foreach(False, small)  # an explicit choice wins
    assert not use_foreach(None, [])


def test_second_step_does_not_precondition_twice():
    params = _model_params()
    groups, names0, _ = _groups(params, 0.1, 0.1)
    opt = ScaledSGD(groups, lr=1e-2)
    for p in params.values():
        p.grad = torch.ones_like(p)
    before = {n: p.detach().clone() for n, p in params.items()}
    opt.step()
    first = {n: p.detach() - before[n] for n, p in params.items()}
    mid = {n: p.detach().clone() for n, p in params.items()}
    opt.step()
    # the second step preconditions the same .grad once, with the moved factors
    tilde = _hand_preconditioned(mid, {n: torch.ones_like(p) for n, p in params.items()},
                                 dict.fromkeys(params, 0.1))
    for n, p in params.items():
        lr, wd = (1e-2, 0.0) if n in names0 else (3e-2, 0.05)
        torch.testing.assert_close(p.detach(), mid[n] - lr * (tilde[n] + wd * mid[n]))
        assert first[n].abs().sum() > 0


def test_reparametrisation_invariance_to_first_order():
    """With reg = 0, scaled GD moves B @ A identically from (B, A) and (B R^-1, R A); SGD does not."""
    g = torch.Generator().manual_seed(0)
    m, n, r = 9, 8, 3
    target = torch.randn(m, n, generator=g, dtype=torch.float64)
    b0 = torch.randn(m, r, generator=g, dtype=torch.float64)
    a0 = torch.randn(r, n, generator=g, dtype=torch.float64)
    rot = torch.randn(r, r, generator=g, dtype=torch.float64) + 3 * torch.eye(r, dtype=torch.float64)
    lr = 1e-6

    def product_velocity(cls, b_init, a_init, **kw):
        b = b_init.clone().requires_grad_()
        a = a_init.clone().requires_grad_()
        opt = cls([("l.lora_A.w", a), ("l.lora_B.w", b)], lr=lr, **kw) if cls is ScaledSGD else \
            cls([a, b], lr=lr)
        loss = 0.5 * ((b @ a - target) ** 2).sum()
        loss.backward()
        before = (b @ a).detach()
        opt.step()
        return ((b @ a).detach() - before) / lr

    v1 = product_velocity(ScaledSGD, b0, a0, reg=0.0)
    v2 = product_velocity(ScaledSGD, b0 @ torch.linalg.inv(rot), rot @ a0, reg=0.0)
    torch.testing.assert_close(v1, v2, rtol=1e-4, atol=1e-4)
    s1 = product_velocity(torch.optim.SGD, b0, a0)
    s2 = product_velocity(torch.optim.SGD, b0 @ torch.linalg.inv(rot), rot @ a0)
    assert (s1 - s2).norm() > 0.1 * s1.norm()


def _factorisation_iterations(cls, kappa, lr, tol=1e-3, max_iter=5000, **kw):
    """Iterations of full-batch GD on 0.5||B A - M||^2 until ||BA - M|| / ||M|| < tol."""
    g = torch.Generator().manual_seed(0)
    m, n, r = 20, 20, 3
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    sig = torch.logspace(0, -torch.log10(torch.tensor(float(kappa))).item(), r, dtype=torch.float64)
    target = u @ torch.diag(sig) @ v.T
    # spectral-style start near, not at, the solution (as in Tong, Ma & Chi 2021)
    b = (u * sig.sqrt() + 0.1 * torch.randn(m, r, generator=g, dtype=torch.float64) / m ** 0.5).requires_grad_()
    a = ((v * sig.sqrt()).T + 0.1 * torch.randn(r, n, generator=g, dtype=torch.float64) / n ** 0.5).requires_grad_()
    opt = cls([("f.lora_A.w", a), ("f.lora_B.w", b)], lr=lr, **kw) if cls is ScaledSGD else cls([a, b], lr=lr)
    for it in range(max_iter):
        opt.zero_grad()
        loss = 0.5 * ((b @ a - target) ** 2).sum()
        if ((b @ a - target).norm() / target.norm()).item() < tol:
            return it
        loss.backward()
        opt.step()
    return max_iter


def test_scaled_gd_iterations_do_not_grow_with_condition_number():
    scaled = [_factorisation_iterations(ScaledSGD, k, lr=0.5, reg=0.0) for k in (1, 10, 100)]
    plain = [_factorisation_iterations(torch.optim.SGD, k, lr=0.5) for k in (1, 10, 100)]
    assert max(scaled) <= 2 * min(scaled) + 5, scaled
    assert plain[2] > 10 * plain[0], plain
    assert scaled[2] * 10 < plain[2]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_factors_are_preconditioned_in_float32(dtype):
    params = {n: p.detach().to(dtype).requires_grad_() for n, p in _model_params(torch.float32).items()}
    groups, names0, names1 = _groups(params, 0.1, 0.1)
    # eps must be representable in fp16 (1e-8 underflows to 0 and torch's fp16 AdamW divides 0 by 0)
    opt = ScaledAdamW(groups, lr=1e-2, eps=1e-4)
    grads = {n: torch.randn_like(p) for n, p in params.items()}
    for n, p in params.items():
        p.grad = grads[n].clone()
    values = {n: p.detach().float() for n, p in params.items()}
    tilde = _hand_preconditioned(values, {n: g.float() for n, g in grads.items()}, dict.fromkeys(params, 0.1))
    # reference: torch's fused AdamW (the kernel ScaledAdamW uses by default; it computes in float32
    # internally, where torch's per-tensor fp16 AdamW underflows v) in the same dtype on g~ cast to
    # the gradient dtype
    ref = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
    ref_opt = torch.optim.AdamW([{"params": [ref[n] for n in names0], "lr": 1e-2},
                                 {"params": [ref[n] for n in names1], "lr": 3e-2, "weight_decay": 0.05}], lr=1e-2,
                                eps=1e-4, fused=True)
    for n in ref:
        ref[n].grad = tilde[n].to(dtype)
    opt.step()
    ref_opt.step()
    for n, p in params.items():
        assert p.dtype == dtype and opt.state[p]["exp_avg"].dtype == dtype
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p.detach().float(), ref[n].detach().float(), rtol=2e-2, atol=2e-2)
        assert not torch.equal(p.detach(), values[n].to(dtype))


def test_zero_b_with_zero_reg_falls_back_to_pseudo_inverse():
    a = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(6, 4, dtype=torch.float64, requires_grad=True)  # peft's init
    opt = ScaledSGD([("l.lora_A.default.weight", a), ("l.lora_B.default.weight", b)], lr=0.1, reg=0.0)
    loss = ((b @ a - torch.ones(6, 8, dtype=torch.float64)) ** 2).sum()
    loss.backward()
    a0, g_b = a.detach().clone(), b.grad.clone()
    opt.step()
    # B^T B = 0 is singular: its pseudo-inverse is 0, so A (whose gradient is 0 anyway) stays put;
    # B moves with the true inverse of A A^T.
    assert torch.equal(a.detach(), a0)
    torch.testing.assert_close(b.detach(), -0.1 * g_b @ torch.linalg.inv(a0 @ a0.T), rtol=1e-10, atol=1e-12)


def test_rank_deficient_gram_uses_the_pseudo_inverse():
    a = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    b0 = torch.randn(4, 3, dtype=torch.float64)
    b0[:, 2] = 0  # one dead column: B^T B has rank 2
    b = b0.clone().requires_grad_()
    opt = ScaledSGD([("l.lora_down.weight", a), ("l.lora_up.weight", b)], lr=0.1, reg=0.0)
    (b @ a).sin().sum().backward()
    a0, g_a = a.detach().clone(), a.grad.clone()
    opt.step()
    want = a0 - 0.1 * torch.linalg.pinv(b0.T @ b0) @ g_a
    torch.testing.assert_close(a.detach(), want, rtol=1e-8, atol=1e-10)


def test_partial_grads_and_frozen_params():
    a = torch.randn(2, 5, requires_grad=True)
    b = torch.randn(3, 2, requires_grad=True)
    frozen = torch.randn(3, 5)  # requires_grad=False: dropped
    opt = ScaledAdamW([("w", frozen), ("l.lora_A.x.weight", a), ("l.lora_B.x.weight", b)], lr=0.1)
    assert opt.param_groups[0]["param_names"] == ["l.lora_A.x.weight", "l.lora_B.x.weight"]
    b.grad = torch.ones_like(b)  # A has no grad this step
    a0 = a.detach().clone()
    opt.step()
    assert torch.equal(a.detach(), a0) and len(opt.state[a]) == 0


def test_loop_path_for_large_factors_matches_stacked_path(monkeypatch):
    """Big buckets skip stacking (per-tensor matmuls); the result must not change."""
    import difflora.optim.preconditioner as pre

    results = []
    for limit in (1 << 20, 0):
        monkeypatch.setattr(pre, "_STACK_LIMIT", limit)
        params = _model_params()
        groups, _, _ = _groups(params, 0.1, 0.2)
        opt = ScaledAdamW(groups, lr=1e-2)
        for p in params.values():
            p.grad = torch.ones_like(p)
        opt.step()
        results.append({n: p.detach().clone() for n, p in params.items()})
    for n in results[0]:
        torch.testing.assert_close(results[0][n], results[1][n], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("flatten", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cols", [16, 140_000])  # a small stacked bucket; a bucket over the stacking limit
def test_cached_plan_equals_the_direct_computation(dtype, cols, flatten):
    from difflora.optim.plan import PreconditionPlan
    from difflora.optim.preconditioner import precondition_pairs

    g = torch.Generator().manual_seed(0)
    a = [torch.randn(4, cols, generator=g).to(dtype) for _ in range(2)]
    b = [torch.randn(cols // 2, 4, generator=g).to(dtype) for _ in range(2)]
    ga = [torch.randn(x.shape, generator=g).to(dtype) for x in a]
    gb = [torch.randn(x.shape, generator=g).to(dtype) for x in b]
    regs = [1e-3, 1e-3]
    before = [t.clone() for t in a + b]
    plan = PreconditionPlan(PreconditionPlan.signature_of(a, b, ga, gb), a, b, ga, gb, flatten=flatten)
    bucket = plan.buckets[0]
    assert bucket.stack_factors == (cols == 16) and ("ga" in bucket.stacks) == (cols == 16)
    # Flattening moves the factors into one buffer per side without changing a value.
    assert (bucket.a_buf is not None) == flatten
    for t, t0 in zip(a + b, before):
        assert torch.equal(t, t0)
    if flatten:
        assert a[1].data_ptr() - a[0].data_ptr() == a[0].numel() * a[0].element_size()
        assert plan.intact()
    want_a, want_b = precondition_pairs(a, b, ga, gb, regs, regs)
    got_a, got_b = plan.run(a, b, ga, gb, regs, regs)
    # Exact without flattening (same kernels); flat Grams are one batched matmul where the reference
    # loops over large factors, so the sums may round differently there.
    tol = 0 if not flatten or cols == 16 else (1e-4 if dtype == torch.float32 else 1e-2)
    for got, want in zip(got_a + got_b, want_a + want_b):
        assert got.dtype == want.dtype == dtype
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())
    if flatten:  # storage replaced behind the plan's back: noticed
        a[0].data = a[0].data.clone()
        assert not plan.intact()


def test_flat_factors_follow_model_to_and_load_state_dict_assign():
    """A model whose factors were flattened and later moved or re-assigned keeps training correctly."""
    params = _model_params()
    groups, _, _ = _groups(params, 0.1, 0.2)
    flat = ScaledAdamW(groups, lr=1e-2)
    ref_params = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
    ref_groups, _, _ = _groups(ref_params, 0.1, 0.2)
    ref = ScaledAdamW(ref_groups, lr=1e-2, flatten=False)
    for step in range(3):
        for ps in (params, ref_params):
            for i, p in enumerate(ps.values()):
                p.grad = torch.full_like(p, 0.1 * (i + 1) * (step + 1))
        flat.step()
        ref.step()
        if step == 0:  # new storage, as load_state_dict(assign=True) or .to() gives
            for p in params.values():
                p.data = p.data.clone()
    for n in params:
        torch.testing.assert_close(params[n], ref_params[n], rtol=1e-12, atol=1e-12, msg=n)
