"""Training examples: decoded images with prompts (and masks), drawn deterministically.

An :class:`ImageSet` holds each image once; an epoch lists each of them ``repeats`` times (an
*entry* per repetition). Example ``k`` of the endless stream is a pure function of
``(seed, k)``: the epoch order, and each entry's crop, flip and caption variation, come from
generators keyed by ``(seed, epoch, entry)``, so a resumed run sees exactly the examples an
uninterrupted run would have seen, and so does every process of a multi-process run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from difflora.data.buckets import Buckets, bucket_epoch_length, bucket_order
from difflora.data.captions import CaptionRules
from difflora.data.images import cover_and_crop, cover_size, load_image, read_image, to_tensor
from difflora.errors import UserError


@dataclass
class Example:
    pixel_values: torch.Tensor  # (3, H, W) in [-1, 1]; H = W = resolution unless bucketed
    prompt: str
    original_size: tuple[int, int]  # (h, w) of the image as read, SDXL micro-conditioning
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the resized (and flipped) image
    mask: torch.Tensor | None = None  # (1, H, W) in [0, 1], cropped and flipped with the image

    @property
    def target_size(self) -> tuple[int, int]:
        """(h, w) of the pixels: SDXL's target-size conditioning."""
        return int(self.pixel_values.shape[-2]), int(self.pixel_values.shape[-1])


def _key(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 100_003 + index) % (2**63)


class ImageSet:
    """Images with prompts (and masks), augmented deterministically per (seed, epoch, entry).

    ``repeats``: how often each image is listed per epoch (default once each). ``buckets``: crop
    each image to its aspect-ratio bucket instead of a ``resolution`` square. ``caption_rules``:
    per-draw caption dropout / tag shuffling.
    """

    def __init__(self, paths: list[Path], prompts: list[str], resolution: int, center_crop: bool = False,
                 random_flip: bool = False, seed: int = 0, masks: list[Path | None] | None = None,
                 images: list[Image.Image] | None = None, *, repeats: list[int] | None = None,
                 buckets: Buckets | None = None, caption_rules: CaptionRules | None = None):
        self.paths, self.prompts = paths, prompts
        self.resolution, self.center_crop, self.random_flip, self.seed = resolution, center_crop, random_flip, seed
        # ``images``: already decoded by read_images (each file is decoded once).
        self.images = list(images) if images is not None else [load_image(p) for p in paths]
        # Masks (white = the subject) weight the loss; an image without one counts everywhere.
        self._masks = None if masks is None else [
            read_image(m, "L") if m is not None else Image.new("L", im.size, 255)
            for m, im in zip(masks, self.images)]
        if self._masks is not None:
            for m, im, p in zip(self._masks, self.images, paths):
                if m.size != im.size:
                    raise UserError(f"the mask of '{p.name}' is {m.size[0]}x{m.size[1]} but the image is "
                                    f"{im.size[0]}x{im.size[1]}; give masks the size of their images")
        self.repeats = list(repeats) if repeats is not None else [1] * len(self.images)
        self.entries = [i for i, n in enumerate(self.repeats) for _ in range(n)]
        self.caption_rules = caption_rules or CaptionRules()
        self.buckets = buckets
        # (w, h) each image is cropped to: its bucket, or the training square.
        self.sizes = [buckets.nearest(*im.size) if buckets else (resolution, resolution) for im in self.images]
        self._bucket_of = [self.sizes[i] for i in self.entries]
        self._orders: dict[tuple[int, int], list[int]] = {}

    @property
    def fixed_pixels(self) -> bool:
        """Whether every draw of an image gives the same pixels: no flips, and crops with no freedom
        (centred, or the resized image already has the crop's size). Its latents can then be reused."""
        if self.random_flip:
            return False
        return self.center_crop or all(cover_size(im.size, t) == t for im, t in zip(self.images, self.sizes))

    def __len__(self) -> int:
        """Entries per epoch: each image ``repeats`` times."""
        return len(self.entries)

    def example(self, index: int, epoch: int) -> Example:
        """Entry ``index`` as drawn in ``epoch``: cropped to its size, maybe flipped, its caption varied."""
        g = torch.Generator().manual_seed(_key(self.seed, epoch, index))
        image_index = self.entries[index]
        image = self.images[image_index]
        target = self.sizes[image_index]
        original = (image.height, image.width)
        image, (top, left) = cover_and_crop(image, target, self.center_crop, g)
        flip = self.random_flip and bool(torch.rand((), generator=g) < 0.5)
        if flip:
            image = ImageOps.mirror(image)
        mask = None
        if self._masks is not None:
            m = self._masks[image_index]
            m = m.resize(cover_size(m.size, target), Image.Resampling.BILINEAR)
            m = m.crop((left, top, left + target[0], top + target[1]))
            if flip:
                m = ImageOps.mirror(m)
            mask = torch.from_numpy(np.asarray(m, dtype=np.float32).copy())[None] / 255.0
        if flip:  # SDXL's crop conditioning: where the crop lies in the mirrored resized image
            left = cover_size(self.images[image_index].size, target)[0] - left - target[0]
        prompt = self.prompts[image_index]
        if self.caption_rules.active:
            cg = torch.Generator().manual_seed((_key(self.seed, epoch, index) * 31 + 17) % (2**63))
            prompt = self.caption_rules.apply(prompt, cg)
        return Example(to_tensor(image), prompt, original, (top, left), mask)

    def epoch_length(self, batch: int = 1) -> int:
        """Examples per epoch when drawn ``batch`` at a time (bucketed sets round each bucket up)."""
        return bucket_epoch_length(self._bucket_of, batch) if self.buckets else len(self)

    def order(self, epoch: int, batch: int = 1) -> list[int]:
        """The shuffled entry order of one epoch (same for every process and every resume).

        Bucketed: aligned groups of ``batch`` entries of one bucket (:func:`bucket_order`).
        """
        key = (epoch, batch if self.buckets else 1)
        if key not in self._orders:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            if self.buckets:
                ids = {s: i for i, s in enumerate(sorted(set(self._bucket_of)))}
                self._orders = {key: bucket_order([ids[s] for s in self._bucket_of], batch, g)}
            else:
                self._orders = {key: torch.randperm(len(self), generator=g).tolist()}
        return self._orders[key]

    def draw(self, k: int, batch: int = 1) -> Example:
        """The k-th example of the endless stream of shuffled epochs, drawn ``batch`` at a time."""
        epoch, pos = divmod(k, self.epoch_length(batch))
        return self.example(self.order(epoch, batch)[pos], epoch)
