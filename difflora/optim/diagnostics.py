"""What the preconditioner sees: condition numbers of the r x r Grams B^T B and A A^T.

The scaled optimizers invert ``B^T B + reg I`` and ``A A^T + reg I`` every step; how far these
Grams are from the identity (their condition number) says how much the preconditioner reshapes
the step. Trackers log the median and maximum over all LoRA pairs, so a run shows when factors
become ill-conditioned (a near-zero ``B`` early in training gives huge numbers on purpose).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from difflora.optim.pairing import pair_factors


@torch.no_grad()
def gram_condition_numbers(named_params: Iterable[tuple[str, torch.Tensor]]) -> dict[str, float]:
    """Median and max condition numbers of ``B^T B`` and ``A A^T`` over the LoRA pairs.

    Cheap enough to call at every logging step: one eigvalsh of an r x r matrix per factor, in
    float32, batched by rank. Returns ``{}`` when no LoRA pair is found. A singular Gram (e.g.
    ``B = 0`` at the start) has an infinite condition number; it is reported as ``inf``.
    """
    items = list(named_params)
    if not items:
        return {}
    names, params = [n for n, _ in items], [p for _, p in items]
    pairs = pair_factors([names], [params])
    if not pairs:
        return {}
    grams: dict[str, dict[int, list[torch.Tensor]]] = {"BtB": {}, "AAt": {}}
    for pair in pairs:
        a = params[pair.a[1]].detach().float().flatten(1)  # (r, in)
        b = params[pair.b[1]].detach().float().flatten(1)  # (out, r)
        grams["AAt"].setdefault(a.shape[0], []).append(a @ a.T)
        grams["BtB"].setdefault(b.shape[1], []).append(b.T @ b)
    out: dict[str, float] = {}
    for label, by_rank in grams.items():
        conds = []
        for mats in by_rank.values():
            eig = torch.linalg.eigvalsh(torch.stack(mats).cpu()).clamp_min(0)  # ascending
            top, low = eig[:, -1], eig[:, 0]
            cond = torch.where(low > 0, top / low.clamp_min(torch.finfo(torch.float32).tiny), torch.inf)
            conds.append(torch.where(top > 0, cond, torch.inf))
        values = torch.cat(conds)
        out[f"cond_{label}_median"] = float(values.median())
        out[f"cond_{label}_max"] = float(values.max())
    return out
