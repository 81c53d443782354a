"""Images in, tensors out: the first step of the data path.

Users hand us folders straight from a phone or the web, so loading is forgiving where it can be
(EXIF rotation, RGBA, palette, grayscale, 16-bit and 32-bit float images all become 8-bit RGB;
unreadable, truncated and decompression-bomb files are skipped with a warning naming them) and
strict where it must be (a missing folder or one with no usable image stops the run with a clear
message). Every image difflora reads (training images, masks, condition images, images to score)
goes through :func:`read_image`, so all of them follow the same rules.

Augmentation is a pure function of ``(seed, epoch, index)`` so a resumed run sees exactly the
crops and flips an uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps

from difflora.config import read_text
from difflora.errors import UserError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


# What Pillow raises on corrupt, truncated or hostile files (its fuzzers see all of these).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError, TypeError,
                  ZeroDivisionError, MemoryError, Image.DecompressionBombError)


class UnreadableImage(UserError):
    """An image file that cannot be decoded; the message names the file and why."""

    def __init__(self, path: Path, reason: str, fix: str = "re-save it as PNG or JPEG"):
        super().__init__(f"cannot read image '{path}' ({reason}); {fix}")
        self.path, self.reason = path, reason


def _to_8bit(im: Image.Image) -> Image.Image:
    """16-bit and 32-bit (integer or float) single-channel images -> 8-bit "L", scaled, not clipped.

    Pillow's own ``convert`` clips these to 0..255, so a float image in [0, 1] (the usual range of
    float TIFFs) came out black and a 16-bit one white. The range is the smallest of [0, 1] (floats
    only), [0, 255], [0, 65535] that holds the pixels, else their maximum; NaN and -inf become 0.
    """
    arr = np.asarray(im, dtype=np.float64)
    finite = np.isfinite(arr)
    peak = float(arr[finite].max()) if finite.any() else 0.0
    ranges = ([1.0] if im.mode == "F" else []) + [255.0, 65535.0]
    top = next((r for r in ranges if peak <= r), peak)
    arr = np.where(finite, arr, np.where(arr > 0, top, 0.0))
    return Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")


def read_image(path: str | Path, mode: Literal["RGB", "L"] = "RGB") -> Image.Image:
    """Decode an image file in full as 8-bit ``mode``, EXIF orientation applied; the one image reader.

    Transparent pixels become white (a cut-out subject on white, not on black). High bit depths
    are scaled (:func:`_to_8bit`). A file Pillow cannot decode, one cut short (a truncated JPEG
    decodes its header fine and fails only here), or one whose header claims more pixels than
    Pillow's decompression-bomb limit raises :class:`UnreadableImage`. Images between Pillow's
    warning and error limits are decoded, with one logged warning instead of Pillow's.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                opened.load()
                try:
                    im = ImageOps.exif_transpose(opened)
                except _DECODE_ERRORS:  # a damaged EXIF block: the pixels are fine, keep them as stored
                    im = opened.copy()
        if any(issubclass(w.category, Image.DecompressionBombWarning) for w in caught):
            logger.warning("image '%s' is %dx%d pixels, over Pillow's decompression-bomb warning limit; "
                           "it is decoded in full (downscale it to save memory)", path, im.width, im.height)
        if im.mode.startswith("I") or im.mode == "F":
            im = _to_8bit(im)
        if mode == "L":
            return im.convert("L")
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            background = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(background, im)
        return im.convert("RGB")
    except Image.DecompressionBombError as err:
        raise UnreadableImage(path, f"too large to decode safely: {str(err).split(',')[0]}",
                              "downscale it") from None
    except FileNotFoundError:
        raise UnreadableImage(path, "no such file", "check the path") from None
    except _DECODE_ERRORS as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UnreadableImage(path, reason) from None


def load_image(path: str | Path) -> Image.Image:
    """Any image file as 8-bit RGB (see :func:`read_image`)."""
    return read_image(path, "RGB")


def read_images(folder: str | Path, what: str = "instance", mode: Literal["RGB", "L"] = "RGB"
                ) -> tuple[list[Path], list[Image.Image]]:
    """Decode every image in ``folder`` (sorted by name), skipping and naming unreadable ones.

    Each file is decoded in full: a header check alone passes truncated files, which then fail
    in the middle of a run. Only a folder left with no readable image is an error.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{what} folder '{folder}' does not exist; check --{what}_data_dir")
    candidates = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    paths, images, bad = [], [], []
    for p in candidates:
        try:
            images.append(read_image(p, mode))
            paths.append(p)
        except UnreadableImage as err:
            bad.append(f"{p.name} ({err.reason})")
    if bad and paths:
        logger.warning("skipping %d unreadable image(s) in %s: %s", len(bad), folder, "; ".join(bad))
    if not paths:
        if not candidates:
            raise UserError(f"{what} folder '{folder}' is empty; add jpg/png/webp images to it")
        raise UserError(f"{what} folder '{folder}' has no readable image ({'; '.join(bad)}); "
                        "add jpg/png/webp images to it")
    return paths, images


def find_images(folder: str | Path, what: str = "instance") -> list[Path]:
    """Readable images in ``folder`` (sorted), skipping and naming unreadable ones."""
    return read_images(folder, what)[0]


def read_caption(image_path: Path, default: str) -> str:
    """The caption in ``name.txt`` beside the image, or ``default``."""
    txt = image_path.with_suffix(".txt")
    if txt.is_file():
        text = read_text(txt, "caption file").strip()
        if text:
            return text
    return default


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> float tensor (3, H, W) in [-1, 1], the range the VAE expects."""
    arr = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    return arr / 127.5 - 1.0


def resize_and_crop(image: Image.Image, resolution: int, center_crop: bool,
                    generator: torch.Generator | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Resize the shorter side to ``resolution`` and crop a square; return the crop's top-left."""
    w, h = image.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    image = image.resize((nw, nh), Image.Resampling.BICUBIC)
    if center_crop or generator is None:
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
    else:
        left = int(torch.randint(0, nw - resolution + 1, (1,), generator=generator))
        top = int(torch.randint(0, nh - resolution + 1, (1,), generator=generator))
    return image.crop((left, top, left + resolution, top + resolution)), (top, left)


@dataclass
class Example:
    pixel_values: torch.Tensor  # (3, R, R) in [-1, 1]
    prompt: str
    original_size: tuple[int, int]  # (h, w), SDXL micro-conditioning
    crop_top_left: tuple[int, int]
    mask: torch.Tensor | None = None  # (1, R, R) in [0, 1], cropped and flipped with the image


class ImageSet:
    """A folder of images with prompts, augmented deterministically per (seed, epoch, index)."""

    def __init__(self, paths: list[Path], prompts: list[str], resolution: int, center_crop: bool = False,
                 random_flip: bool = False, seed: int = 0, masks: list[Path | None] | None = None,
                 images: list[Image.Image] | None = None):
        self.paths, self.prompts = paths, prompts
        self.resolution, self.center_crop, self.random_flip, self.seed = resolution, center_crop, random_flip, seed
        # ``images``: already decoded by read_images (each file is decoded once).
        self._images = list(images) if images is not None else [load_image(p) for p in paths]
        # Masks (white = the subject) weight the loss; an image without one counts everywhere.
        self._masks = None if masks is None else [
            read_image(m, "L") if m is not None else Image.new("L", im.size, 255)
            for m, im in zip(masks, self._images)]
        if self._masks is not None:
            for m, im, p in zip(self._masks, self._images, paths):
                if m.size != im.size:
                    raise UserError(f"the mask of '{p.name}' is {m.size[0]}x{m.size[1]} but the image is "
                                    f"{im.size[0]}x{im.size[1]}; give masks the size of their images")

    def __len__(self) -> int:
        return len(self.paths)

    def example(self, index: int, epoch: int) -> Example:
        g = torch.Generator().manual_seed(((self.seed * 1_000_003 + epoch) * 100_003 + index) % (2**63))
        image = self._images[index]
        original = (image.height, image.width)
        image, crop = resize_and_crop(image, self.resolution, self.center_crop, g)
        flip = self.random_flip and bool(torch.rand((), generator=g) < 0.5)
        if flip:
            image = ImageOps.mirror(image)
        mask = None
        if self._masks is not None:
            m = self._masks[index]
            scale = self.resolution / min(m.size)
            size = (max(self.resolution, round(m.width * scale)), max(self.resolution, round(m.height * scale)))
            top, left = crop
            m = m.resize(size, Image.Resampling.BILINEAR).crop(
                (left, top, left + self.resolution, top + self.resolution))
            if flip:
                m = ImageOps.mirror(m)
            mask = torch.from_numpy(np.asarray(m, dtype=np.float32).copy())[None] / 255.0
        return Example(to_tensor(image), self.prompts[index], original, crop, mask)

    def order(self, epoch: int) -> list[int]:
        """The shuffled index order of one epoch (same for every process and every resume)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self), generator=g).tolist()


def load_image_set(folder: str | Path, prompt: str, resolution: int, *, center_crop: bool = False,
                   random_flip: bool = False, captions: bool = False, seed: int = 0,
                   what: str = "instance", caption_dir: str | Path | None = None,
                   mask_dir: str | Path | None = None) -> ImageSet:
    """Find, validate and load a folder of training images with their prompts (and masks).

    Captions are ``name.txt`` beside each image, or in ``caption_dir`` when given; masks are
    ``name.png`` (any image format) in ``mask_dir``.
    """
    paths, images = read_images(folder, what)
    if caption_dir is not None and not Path(caption_dir).is_dir():
        raise UserError(f"caption folder '{caption_dir}' does not exist; check --caption_dir")
    if captions or caption_dir is not None:
        where = Path(caption_dir) if caption_dir is not None else None
        prompts = [read_caption(where / p.name if where else p, prompt) for p in paths]
    else:
        prompts = [prompt] * len(paths)
    masks = None
    if mask_dir is not None:
        if not Path(mask_dir).is_dir():
            raise UserError(f"mask folder '{mask_dir}' does not exist; check --mask_dir")
        found = {m.stem: m for m in find_images(mask_dir, "mask")}
        masks = [found.get(p.stem) for p in paths]
        if all(m is None for m in masks):
            raise UserError(f"no mask in '{mask_dir}' matches an image name; name each mask like its image "
                            "(e.g. 0.png for 0.jpg)")
        missing = [p.name for p, m in zip(paths, masks) if m is None]
        if missing:
            logger.warning("no mask for %s: their loss covers the whole image", ", ".join(missing))
    return ImageSet(paths, prompts, resolution, center_crop, random_flip, seed, masks, images=images)
