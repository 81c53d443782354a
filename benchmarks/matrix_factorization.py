"""Iterations to fit an ill-conditioned low-rank matrix: GD, scaled GD, Adam, scaled Adam.

Reproduce:  python benchmarks/matrix_factorization.py [--out DIR]

Problem: minimise 0.5 ||B A - M||_F^2 with M = U diag(s) V^T (50 x 50, rank 4, singular values
log-spaced from 1 to 1/kappa), B (50 x 4) and A (4 x 50) initialised the LoRA way (A random with
rows of norm ~1, B = 0). Full-batch; an iteration is one optimizer step with the exact gradient.
Reported: iterations until ||B A - M||_F / ||M||_F < 1e-4 (capped at --max-iter).

Step sizes: GD lr = 0.5 / s_max (the stable fixed step); scaled GD lr = 0.5 (its natural step,
independent of kappa); Adam and scaled Adam use the best of lr in {1e-3, 3e-3, 1e-2, 3e-2} per
kappa (tuned, reported). The scaled methods are difflora's ScaledSGD / ScaledAdamW themselves.
A reg sweep at kappa = 100 shows what the damping costs and buys.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from difflora.optim import DEFAULT_REG, ScaledAdamW, ScaledSGD

M_DIM, RANK, TOL = 50, 4, 1e-4
ADAM_LRS = (1e-3, 3e-3, 1e-2, 3e-2)


def problem(kappa: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(M_DIM, RANK, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(M_DIM, RANK, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -math.log10(kappa), RANK, dtype=torch.float64)
    a0 = torch.randn(RANK, M_DIM, generator=g, dtype=torch.float64) / M_DIM ** 0.5
    return u @ torch.diag(s) @ v.T, a0


def iterations(method: str, kappa: float, lr: float, reg: float = 0.0, max_iter: int = 20000) -> int:
    """Iterations until the relative error is below TOL (max_iter if never)."""
    target, a0 = problem(kappa)
    a = a0.clone().requires_grad_()
    b = torch.zeros(M_DIM, RANK, dtype=torch.float64, requires_grad=True)
    named = [("f.lora_A.w", a), ("f.lora_B.w", b)]
    opt = {
        "GD": lambda: torch.optim.SGD([a, b], lr=lr),
        "scaled GD": lambda: ScaledSGD(named, lr=lr, reg=reg),
        "Adam": lambda: torch.optim.AdamW([a, b], lr=lr, weight_decay=0.0),
        "scaled Adam": lambda: ScaledAdamW(named, lr=lr, reg=reg, weight_decay=0.0),
    }[method]()
    norm = target.norm()
    for it in range(max_iter):
        with torch.no_grad():
            resid = b @ a - target
            if not torch.isfinite(resid).all():
                return max_iter
            if resid.norm() / norm < TOL:
                return it
            a.grad = b.T @ resid
            b.grad = resid @ a.T
        opt.step()
    return max_iter


def best_lr(method: str, kappa: float, reg: float, max_iter: int) -> tuple[int, float]:
    return min((iterations(method, kappa, lr, reg, max_iter), lr) for lr in ADAM_LRS)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--max-iter", type=int, default=20000)
    parser.add_argument("--kappas", type=float, nargs="+", default=[1, 10, 100, 1000])
    parser.add_argument("--reg", type=float, default=DEFAULT_REG)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cap = args.max_iter
    rows = []
    for kappa in args.kappas:
        gd = iterations("GD", kappa, 0.5, max_iter=cap)
        sgd0 = iterations("scaled GD", kappa, 0.5, reg=0.0, max_iter=cap)
        sgdr = iterations("scaled GD", kappa, 0.5, reg=args.reg, max_iter=cap)
        adam, adam_lr = best_lr("Adam", kappa, 0.0, cap)
        sadam, sadam_lr = best_lr("scaled Adam", kappa, args.reg, cap)
        rows.append(dict(kappa=kappa, GD=gd, scaled_GD_reg0=sgd0, scaled_GD=sgdr, Adam=adam, Adam_lr=adam_lr,
                         scaled_Adam=sadam, scaled_Adam_lr=sadam_lr))
    fmt = lambda n: f">{cap}" if n >= cap else str(n)  # noqa: E731
    print(f"Iterations to relative error {TOL:g} (50x50, rank 4, LoRA init B=0; cap {cap}); reg = {args.reg:g}\n")
    print("| kappa | GD (lr 0.5) | scaled GD reg=0 (lr 0.5) | scaled GD reg (lr 0.5) | Adam (best lr) "
          "| scaled Adam reg (best lr) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['kappa']:g} | {fmt(r['GD'])} | {fmt(r['scaled_GD_reg0'])} | {fmt(r['scaled_GD'])} "
              f"| {fmt(r['Adam'])} ({r['Adam_lr']:g}) | {fmt(r['scaled_Adam'])} ({r['scaled_Adam_lr']:g}) |")
    regs = [0.0, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    sweep = []
    for reg in regs:
        sg = iterations("scaled GD", 100, 0.5, reg=reg, max_iter=cap)
        sa, sa_lr = best_lr("scaled Adam", 100, reg, cap)
        sg10 = iterations("scaled GD", 1000, 0.5, reg=reg, max_iter=cap)
        sweep.append(dict(reg=reg, scaled_GD_k100=sg, scaled_GD_k1000=sg10, scaled_Adam_k100=sa,
                          scaled_Adam_lr=sa_lr))
    print("\nreg sweep (iterations; scaled Adam at its best lr)\n")
    print("| reg | scaled GD kappa=100 | scaled GD kappa=1000 | scaled Adam kappa=100 |")
    print("|---:|---:|---:|---:|")
    for s in sweep:
        print(f"| {s['reg']:g} | {fmt(s['scaled_GD_k100'])} | {fmt(s['scaled_GD_k1000'])} "
              f"| {fmt(s['scaled_Adam_k100'])} ({s['scaled_Adam_lr']:g}) |")

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "matrix_factorization.json").write_text(json.dumps(dict(tol=TOL, cap=cap, reg=args.reg,
                                                                        rows=rows, reg_sweep=sweep), indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ks = [r["kappa"] for r in rows]
    for key, label in (("GD", "GD"), ("scaled_GD", f"scaled GD (reg {args.reg:g})"), ("Adam", "Adam (tuned lr)"),
                       ("scaled_Adam", f"scaled Adam (reg {args.reg:g}, tuned lr)")):
        ax.plot(ks, [r[key] for r in rows], marker="o", label=label)
    ax.set(xscale="log", yscale="log", xlabel="condition number", ylabel=f"iterations to rel. error {TOL:g}",
           title="Low-rank matrix factorisation (cap = did not converge)")
    ax.axhline(cap, color="grey", ls=":")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "matrix_factorization.png", dpi=100)
    print(f"\nwrote {args.out / 'matrix_factorization.png'} and matrix_factorization.json")


if __name__ == "__main__":
    main()
