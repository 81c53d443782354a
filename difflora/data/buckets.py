"""Aspect-ratio buckets (kohya's ``--enable_bucket``): train on wide and tall images without
cropping them square.

The buckets are the (width, height) pairs, multiples of ``step``, between ``min_reso`` and
``max_reso`` on each side, whose area is at most ``resolution**2`` (the square one included).
Each image goes to the bucket whose aspect ratio is nearest its own, is resized to cover it and
cropped. Batches never mix buckets: an epoch is a shuffled list of groups of ``batch`` examples
of one bucket (see :func:`bucket_order`), so the latents of a micro-batch stack into one tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from difflora.errors import UserError


@dataclass(frozen=True)
class Buckets:
    """The bucket sizes (w, h), sorted, and the rule that assigns an image to one of them."""

    sizes: tuple[tuple[int, int], ...]

    @classmethod
    def make(cls, resolution: int, min_reso: int = 256, max_reso: int = 1024, step: int = 64) -> Buckets:
        """Every (w, h) on the ``step`` grid within [min_reso, max_reso] with w*h <= resolution**2.

        For each width the tallest height that fits is kept (and its transpose), plus the largest
        square: the buckets kohya makes with the same four numbers.
        """
        check_bucket_options(resolution, min_reso, max_reso, step)
        area = resolution * resolution
        side = resolution // step * step
        sizes = {(side, side)}
        for w in range(min_reso, max_reso + 1, step):
            h = min(max_reso, area // w // step * step)
            if h >= min_reso:
                sizes.update({(w, h), (h, w)})
        return cls(tuple(sorted(sizes)))

    def nearest(self, width: int, height: int) -> tuple[int, int]:
        """The bucket whose aspect ratio w/h is nearest the image's (the first of ties)."""
        ratio = width / height
        return min(self.sizes, key=lambda s: abs(s[0] / s[1] - ratio))


def check_bucket_options(resolution: int, min_reso: int, max_reso: int, step: int) -> None:
    """Refuse bucket settings that give no bucket or sizes the VAE cannot encode (multiples of 8)."""
    if step <= 0 or step % 8:
        raise UserError(f"--bucket_reso_steps must be a positive multiple of 8 (64 is usual), got {step}")
    for flag, value in (("--min_bucket_reso", min_reso), ("--max_bucket_reso", max_reso)):
        if value <= 0 or value % step:
            raise UserError(f"{flag} must be a positive multiple of --bucket_reso_steps ({step}), got {value}")
    if not min_reso <= resolution <= max_reso:
        raise UserError(f"--resolution {resolution} must lie between --min_bucket_reso {min_reso} and "
                        f"--max_bucket_reso {max_reso}")


def bucket_order(bucket_of: list[int], batch: int, generator: torch.Generator) -> list[int]:
    """One epoch's order of the examples ``0..len(bucket_of)-1``, in aligned groups of ``batch``
    examples of one bucket.

    Each bucket's examples are shuffled and cut into groups of ``batch``; a bucket's last, short
    group is filled up from the start of the same shuffled list (so a few examples are seen twice
    that epoch), then the groups are shuffled. Positions ``g * batch .. g * batch + batch - 1`` of
    the result are therefore always one bucket.
    """
    groups: list[list[int]] = []
    for b in sorted(set(bucket_of)):
        members = [i for i, x in enumerate(bucket_of) if x == b]
        members = [members[j] for j in torch.randperm(len(members), generator=generator).tolist()]
        n = math.ceil(len(members) / batch) * batch
        padded = [members[j % len(members)] for j in range(n)]
        groups += [padded[j:j + batch] for j in range(0, n, batch)]
    return [i for g in torch.randperm(len(groups), generator=generator).tolist() for i in groups[g]]


def bucket_epoch_length(bucket_of: list[int], batch: int) -> int:
    """Examples in one epoch of :func:`bucket_order`: each bucket rounded up to whole groups."""
    return sum(math.ceil(bucket_of.count(b) / batch) for b in set(bucket_of)) * batch
