"""The one image reader: every file users hand us becomes 8-bit RGB (or L) pixels, or one line.

Users hand us folders straight from a phone or the web, so loading is forgiving where it can be
(EXIF rotation, RGBA, palette, grayscale, 16-bit and 32-bit float images all become 8-bit RGB;
unreadable, truncated and decompression-bomb files are skipped with a warning naming them) and
strict where it must be (a missing folder or one with no usable image stops the run with a clear
message). Every image difflora reads (training images, masks, condition images, images to score,
rows of a ``datasets`` dataset) goes through :func:`read_image`, so all of them follow the same rules.
"""

from __future__ import annotations

import io
import logging
import struct
import warnings
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
import torch
from PIL import Image, ImageOps

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


def read_image(path: str | Path, mode: Literal["RGB", "L"] = "RGB", data: bytes | None = None) -> Image.Image:
    """Decode an image file in full as 8-bit ``mode``, EXIF orientation applied; the one image reader.

    ``data``: the file's bytes when they are not on disk (a row of a ``datasets`` dataset); ``path``
    then only names the image in messages.

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
            source: Path | BinaryIO = path if data is None else io.BytesIO(data)
            with Image.open(source) as opened:
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


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> float tensor (3, H, W) in [-1, 1], the range the VAE expects."""
    arr = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    return arr / 127.5 - 1.0


def cover_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """The (w, h) an image of ``size`` is resized to so that it just covers ``target`` (w, h)."""
    (w, h), (tw, th) = size, target
    scale = max(tw / w, th / h)
    return max(tw, round(w * scale)), max(th, round(h * scale))


def cover_and_crop(image: Image.Image, target: tuple[int, int], center_crop: bool,
                   generator: torch.Generator | None = None,
                   resample: Image.Resampling = Image.Resampling.BICUBIC) -> tuple[Image.Image, tuple[int, int]]:
    """Resize ``image`` to cover ``target`` (w, h) and crop it there; return the crop and its (top, left).

    The crop is centred, or drawn from ``generator`` (left first, then top: the order every
    seeded run depends on). Masks go through here too, with the same generator state, so
    they are cut exactly like their image.
    """
    tw, th = target
    nw, nh = cover_size(image.size, target)
    image = image.resize((nw, nh), resample)
    if center_crop or generator is None:
        left, top = (nw - tw) // 2, (nh - th) // 2
    else:
        left = int(torch.randint(0, nw - tw + 1, (1,), generator=generator))
        top = int(torch.randint(0, nh - th + 1, (1,), generator=generator))
    return image.crop((left, top, left + tw, top + th)), (top, left)


def resize_and_crop(image: Image.Image, resolution: int, center_crop: bool,
                    generator: torch.Generator | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Resize the shorter side to ``resolution`` and crop a square; return the crop's top-left."""
    return cover_and_crop(image, (resolution, resolution), center_crop, generator)
