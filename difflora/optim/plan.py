"""The optimizers' per-step form of :func:`~difflora.optim.preconditioner.precondition_pairs`.

Same arithmetic as the reference function, arranged so that an SD LoRA (hundreds of pairs in a
handful of shapes) costs little more than the arithmetic itself
(``benchmarks/optimizer_overhead.py``):

* **Flat factors.** Each bucket's factors (same shapes, dtypes, device) are moved, once, into one
  contiguous buffer per side, and every parameter's ``.data`` becomes a view of its slot. The
  parameter objects, values, shapes and strides are unchanged (modules, ``state_dict``,
  ``.grad``, safetensors see no difference), but every Gram matrix of a bucket is then one
  batched matmul over the buffer, with no stacking copy. A parameter whose storage is later
  replaced (``model.to(...)``, ``load_state_dict(assign=True)``) is noticed on the next step and
  the plan is rebuilt. Pass ``flatten=False`` to leave the parameters' storage alone. One
  visible difference: ``torch.save`` of some of the factors writes the whole buffers they live in
  (torch saves storages); safetensors, and every file difflora writes, holds only the tensors.
* **One inverse per rank.** The Gram matrices of all buckets with the same ``r``, compute dtype and
  device sit in one tensor: one Cholesky call for all of them.
* **Products.** Small gradients are stacked into a reused buffer for one batched product; large
  ones are multiplied one by one, where the copy costs more than the launches it saves.

Everything here is derived data (index lists, buffers): never saved, rebuilt when the pairs'
shapes, dtypes, devices or present gradients change. The returned tensors are views of reused
buffers, overwritten by the next :meth:`PreconditionPlan.run`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from difflora.optim import preconditioner as _pc

#: Gradients of at most this many elements are stacked for one batched product; larger ones are
#: multiplied one by one. Measured on SD1.5 LoRA buckets (2 CPU threads): stacking wins up to
#: ``r x cols`` ~ 10k elements (rank 16 x 640), the per-pair loop from ~12k (rank 16 x 768).
STACK_GRAD_NUMEL = 10240


@dataclass
class _Bucket:
    """Pairs with identical factor shapes, dtypes and device, and the same gradients present."""

    ks: list[int]
    r: int
    a_shape: torch.Size
    b_shape: torch.Size
    a_cols: int
    b_rows: int
    cdtype: torch.dtype
    has_ga: bool
    has_gb: bool
    stack_factors: bool  # non-flat buckets: stack the factors for the Grams (else one mm per pair)
    a_buf: Tensor | None = None  # (count, r, a_cols): the factors' own storage once flattened
    b_buf: Tensor | None = None  # (count, b_rows, r)
    stacks: dict[str, Tensor] = field(default_factory=dict)  # reused stacking buffers
    out_a: Tensor | None = None  # (count, r, a_cols): P_A g_A
    out_b: Tensor | None = None  # (count, b_rows, r): g_B P_B
    out_a_list: list[Tensor] = field(default_factory=list)  # views of out_a shaped like A
    out_b_list: list[Tensor] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.ks)

    def gram_into(self, dst: Tensor, left: bool, all_factors: Sequence[Tensor]) -> None:
        """``dst[i] = B_i^T B_i`` (``left``; ``all_factors`` are every pair's B) or ``A_i A_i^T``."""
        buf = self.b_buf if left else self.a_buf  # flattened: the factors themselves, nothing to gather
        if buf is None and self.stack_factors:
            shaped = [self._as_matrix(all_factors[k], left) for k in self.ks]
            buf = torch.stack(shaped, out=self.stacks["b" if left else "a"])
        if buf is not None:
            f = buf.to(self.cdtype)
            torch.bmm(f.transpose(1, 2), f, out=dst) if left else torch.bmm(f, f.transpose(1, 2), out=dst)
            return
        for i, k in enumerate(self.ks):
            f = self._as_matrix(all_factors[k], left).to(self.cdtype)
            torch.mm(f.T, f, out=dst[i]) if left else torch.mm(f, f.T, out=dst[i])

    def multiply_into(self, inv: Tensor, all_grads: Sequence[Tensor | None], for_a: bool) -> None:
        """``out_a[i] = P_i g_i`` (``for_a``; ``all_grads`` are every pair's g_A) or ``out_b[i] = g_i P_i``,
        computed in ``cdtype``."""
        dst = self.out_a if for_a else self.out_b
        shaped = [self._as_matrix(all_grads[k], not for_a) for k in self.ks]  # type: ignore[arg-type]
        stack = self.stacks.get("ga" if for_a else "gb")
        if stack is not None:
            triples = [(inv, torch.stack(shaped, out=stack).to(self.cdtype), dst)]
            mm = torch.bmm
        else:
            triples = [(p, g.to(self.cdtype), d) for p, g, d in zip(inv.unbind(0), shaped, dst)]
            mm = torch.mm
        for p, g, d in triples:
            x, y = (p, g) if for_a else (g, p)
            if d.dtype == self.cdtype:
                mm(x, y, out=d)
            else:
                d.copy_(mm(x, y))

    def _as_matrix(self, t: Tensor, b_side: bool) -> Tensor:
        """A B factor (or its gradient) as ``(b_rows, r)``, an A one as ``(r, a_cols)``; a view."""
        if t.dim() == 2:
            return t
        return t.reshape(self.b_rows, self.r) if b_side else t.reshape(self.r, self.a_cols)


@dataclass
class _InverseGroup:
    """All Gram matrices with one ``r``, compute dtype and device: one damped inverse per step."""

    gram: Tensor  # (n, r, r)
    members: list[tuple[_Bucket, bool, int]]  # (bucket, for_a, offset into gram)


class PreconditionPlan:
    """The cached buckets, buffers and flat factor storage of one optimizer's LoRA pairs.

    :meth:`run` returns what :func:`precondition_pairs` returns for the same arguments (exactly,
    for the same bucketing choices), as views of reused buffers. ``uniform`` is False when a
    bucket's gradients mix dtypes: the caller then uses the reference function.
    """

    def __init__(self, signature: tuple, a_params: Sequence[Tensor], b_params: Sequence[Tensor],
                 a_grads: Sequence[Tensor | None], b_grads: Sequence[Tensor | None], flatten: bool = True) -> None:
        self.signature = signature
        self.n = len(a_params)
        keyed = _pc.bucket_pairs(a_params, b_params, a_grads, b_grads)
        self.uniform = all(
            len({g.dtype for g in (grads[k] for k in ks) if g is not None}) <= 1
            for ks in keyed.values() for grads in (a_grads, b_grads))
        self.buckets: list[_Bucket] = []
        self._flat_params: list[Tensor] = []
        self._flat_ptrs: list[int] = []
        sizes: dict[tuple, int] = {}
        members: dict[tuple, list[tuple[_Bucket, bool, int]]] = {}
        for (a_shape, b_shape, a_dtype, b_dtype, device, no_ga, no_gb), ks in keyed.items():
            if no_ga and no_gb:
                continue
            cdtype, stack_factors = _pc.bucket_mode(a_shape, b_shape, a_dtype, b_dtype, len(ks))
            r = a_shape[0]
            bk = _Bucket(ks=ks, r=r, a_shape=a_shape, b_shape=b_shape, a_cols=a_shape.numel() // r,
                         b_rows=b_shape[0], cdtype=cdtype, has_ga=not no_ga, has_gb=not no_gb,
                         stack_factors=stack_factors)
            count = bk.count
            if flatten and self.uniform:
                self._flatten(bk, [a_params[k] for k in ks], [b_params[k] for k in ks])
            if bk.has_ga:
                ga_dtype = a_grads[ks[0]].dtype  # type: ignore[union-attr]
                out = torch.empty(count, *a_shape, dtype=ga_dtype, device=device)
                bk.out_a, bk.out_a_list = out.view(count, r, bk.a_cols), list(out.unbind(0))
                if bk.b_buf is None and stack_factors:
                    bk.stacks["b"] = torch.empty(count, bk.b_rows, r, dtype=b_dtype, device=device)
                if stack_factors and r * bk.a_cols <= STACK_GRAD_NUMEL:
                    bk.stacks["ga"] = torch.empty(count, r, bk.a_cols, dtype=ga_dtype, device=device)
            if bk.has_gb:
                gb_dtype = b_grads[ks[0]].dtype  # type: ignore[union-attr]
                out = torch.empty(count, *b_shape, dtype=gb_dtype, device=device)
                bk.out_b, bk.out_b_list = out.view(count, bk.b_rows, r), list(out.unbind(0))
                if bk.a_buf is None and stack_factors:
                    bk.stacks["a"] = torch.empty(count, r, bk.a_cols, dtype=a_dtype, device=device)
                if stack_factors and bk.b_rows * r <= STACK_GRAD_NUMEL:
                    bk.stacks["gb"] = torch.empty(count, bk.b_rows, r, dtype=gb_dtype, device=device)
            key = (r, cdtype, device)
            for for_a, present in ((True, bk.has_ga), (False, bk.has_gb)):
                if present:
                    members.setdefault(key, []).append((bk, for_a, sizes.get(key, 0)))
                    sizes[key] = sizes.get(key, 0) + count
            self.buckets.append(bk)
        self.groups = [_InverseGroup(torch.empty(sizes[key], key[0], key[0], dtype=key[1], device=key[2]),
                                     members[key]) for key in members]

    def _flatten(self, bk: _Bucket, a_list: list[Tensor], b_list: list[Tensor]) -> None:
        """Move the bucket's factors into one buffer per side; each parameter's ``.data`` becomes a view."""
        if not all(t.is_contiguous() for t in (*a_list, *b_list)):
            return  # e.g. channels_last conv factors: left where they are
        for side, tensors, shape in (("a", a_list, (bk.r, bk.a_cols)), ("b", b_list, (bk.b_rows, bk.r))):
            buf = torch.empty(bk.count, *shape, dtype=tensors[0].dtype, device=tensors[0].device)
            for slot, t in zip(buf.unbind(0), tensors):
                slot.copy_(t.detach().reshape(shape))
                t.data = slot.view(t.shape)
                self._flat_params.append(t)
                self._flat_ptrs.append(t.data_ptr())
            setattr(bk, f"{side}_buf", buf)

    def intact(self) -> bool:
        """Whether every flattened parameter still lives in its slot (storage not replaced since)."""
        return [p.data_ptr() for p in self._flat_params] == self._flat_ptrs

    @staticmethod
    def signature_of(a_params: Sequence[Tensor], b_params: Sequence[Tensor],
                     a_grads: Sequence[Tensor | None], b_grads: Sequence[Tensor | None]) -> tuple:
        """What the plan depends on; raises ``RuntimeError`` for a sparse gradient."""
        sig = []
        for a, b, ga, gb in zip(a_params, b_params, a_grads, b_grads):
            if ga is not None:
                if ga.is_sparse:
                    raise RuntimeError("scaled optimizers do not support sparse gradients")
                ga = ga.dtype
            if gb is not None:
                if gb.is_sparse:
                    raise RuntimeError("scaled optimizers do not support sparse gradients")
                gb = gb.dtype
            sig.append((a.shape, b.shape, a.dtype, b.dtype, a.device, ga, gb))
        return tuple(sig)

    def run(self, a_params: Sequence[Tensor], b_params: Sequence[Tensor],
            a_grads: Sequence[Tensor | None], b_grads: Sequence[Tensor | None],
            a_regs: Sequence[float], b_regs: Sequence[float]) -> tuple[list[Tensor | None], list[Tensor | None]]:
        """Same results as ``precondition_pairs`` with the same arguments (as views of reused buffers)."""
        out_a: list[Tensor | None] = [None] * self.n
        out_b: list[Tensor | None] = [None] * self.n
        for grp in self.groups:
            regs: list[float] = []
            for bk, for_a, off in grp.members:
                bk.gram_into(grp.gram[off:off + bk.count], for_a, b_params if for_a else a_params)
                pair_regs = a_regs if for_a else b_regs
                regs += [pair_regs[k] for k in bk.ks]
            inv = _pc.damped_inverse(grp.gram, _pc.reg_values(regs, grp.gram.device))
            for bk, for_a, off in grp.members:
                bk.multiply_into(inv[off:off + bk.count], a_grads if for_a else b_grads, for_a)
                out, views = (out_a, bk.out_a_list) if for_a else (out_b, bk.out_b_list)
                for k, t in zip(bk.ks, views):
                    out[k] = t
        return out_a, out_b
