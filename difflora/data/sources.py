"""Where training images come from: a folder (kohya's ``N_name`` sub-folders included) or a
``datasets`` dataset, with their captions, masks and repeat counts; and the one loader both
training jobs call (:func:`load_training_images`).

Folder layout (kohya's DreamBooth layout, read the way kohya reads it): images directly in the
instance folder are listed ``--repeats`` times per epoch with the job's prompt as their default
caption. A sub-folder named ``N_words`` (``10_sks dog``) adds its images ``N`` times per epoch
(``N`` replaces ``--repeats`` for them), with ``words`` as their default caption; a caption file
beside an image still wins when captions are read. Other sub-folders (and ``0_...``) are skipped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from difflora.data.buckets import Buckets
from difflora.data.captions import CaptionRules, caption_extension, read_caption
from difflora.data.image_set import ImageSet
from difflora.data.images import IMAGE_EXTENSIONS, UnreadableImage, find_images, read_image
from difflora.errors import UserError

logger = logging.getLogger(__name__)


@dataclass
class Found:
    """Decoded images of a source with their default captions, repeat counts and lookup keys."""

    paths: list[Path] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    defaults: list[str] = field(default_factory=list)  # caption when no caption file / column gives one
    repeats: list[int] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)  # 'name' or 'sub/name' (no suffix): masks, caption_dir


def repeat_folder(name: str) -> tuple[int, str] | None:
    """``'10_sks dog'`` -> ``(10, 'sks dog')``; None when the name does not start with a count.

    As kohya: the text before the first ``_`` is the count, the rest (``_`` kept) the caption.
    """
    head, _, rest = name.partition("_")
    try:
        return int(head), rest
    except ValueError:
        return None


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def scan_folder(folder: str | Path, prompt: str, repeats: int = 1, what: str = "instance") -> Found:
    """Decode the images of ``folder`` and of its ``N_words`` sub-folders, skipping unreadable ones.

    Each file is decoded in full (a header check passes truncated files, which then fail in the
    middle of a run); only a source left with no readable image is an error.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{what} folder '{folder}' does not exist; check --{what}_data_dir")
    sources: list[tuple[Path, int, str, str]] = [(folder, repeats, prompt, "")]
    skipped = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        parsed = repeat_folder(sub.name)
        if parsed is None or parsed[0] < 1:
            skipped.append(sub.name)
            continue
        sources.append((sub, parsed[0], parsed[1].strip() or prompt, f"{sub.name}/"))
    if skipped and len(sources) > 1:
        logger.warning("ignoring sub-folder(s) of %s without a repeat count >= 1 (name them like '10_sks dog'): %s",
                       folder, ", ".join(skipped))
    found, bad, candidates = Found(), [], 0
    for src, n, default, prefix in sources:
        files = _image_files(src)
        candidates += len(files)
        for p in files:
            try:
                found.images.append(read_image(p, "RGB"))
            except UnreadableImage as err:
                bad.append(f"{prefix}{p.name} ({err.reason})")
                continue
            found.paths.append(p)
            found.defaults.append(default)
            found.repeats.append(n)
            found.keys.append(prefix + p.stem)
    if bad and found.paths:
        logger.warning("skipping %d unreadable image(s) in %s: %s", len(bad), folder, "; ".join(bad))
    if not found.paths:
        if not candidates:
            raise UserError(f"{what} folder '{folder}' is empty; add jpg/png/webp images to it "
                            "(or to sub-folders named like '10_sks dog')")
        raise UserError(f"{what} folder '{folder}' has no readable image ({'; '.join(bad)}); "
                        "add jpg/png/webp images to it")
    return found


def find_masks(mask_dir: str | Path, keys: list[str]) -> list[Path | None]:
    """The mask of each image key: ``mask_dir/sub/name.*`` for an image in a sub-folder, else
    ``mask_dir/name.*`` (any image format); None where there is none."""
    mask_dir = Path(mask_dir)
    if not mask_dir.is_dir():
        raise UserError(f"mask folder '{mask_dir}' does not exist; check --mask_dir")
    found: dict[str, Path] = {}
    if _image_files(mask_dir):
        found.update({m.stem: m for m in find_images(mask_dir, "mask")})
    for sub in {k.split("/", 1)[0] for k in keys if "/" in k}:
        if (mask_dir / sub).is_dir() and _image_files(mask_dir / sub):
            found.update({f"{sub}/{m.stem}": m for m in find_images(mask_dir / sub, "mask")})
    masks = [found.get(k, found.get(k.rsplit("/", 1)[-1])) for k in keys]
    if all(m is None for m in masks):
        raise UserError(f"no mask in '{mask_dir}' matches an image name; name each mask like its image "
                        "(e.g. 0.png for 0.jpg)")
    missing = [k for k, m in zip(keys, masks) if m is None]
    if missing:
        logger.warning("no mask for %s: their loss covers the whole image", ", ".join(missing))
    return masks


def load_image_set(folder: str | Path, prompt: str, resolution: int, *, center_crop: bool = False,
                   random_flip: bool = False, captions: bool = False, seed: int = 0,
                   what: str = "instance", caption_dir: str | Path | None = None,
                   mask_dir: str | Path | None = None, caption_ext: str | None = None, repeats: int = 1,
                   buckets: Buckets | None = None, caption_rules: CaptionRules | None = None) -> ImageSet:
    """Find, validate and load a folder of training images with their prompts (and masks).

    Captions are ``name.txt`` (or ``name<caption_ext>``) beside each image, or in ``caption_dir``
    when given; masks are ``name.png`` (any image format) in ``mask_dir``.
    """
    found = scan_folder(folder, prompt, repeats, what)
    if caption_dir is not None and not Path(caption_dir).is_dir():
        raise UserError(f"caption folder '{caption_dir}' does not exist; check --caption_dir")
    if captions or caption_dir is not None:
        ext, where = caption_extension(caption_ext), Path(caption_dir) if caption_dir is not None else None
        prompts = [read_caption(where / f"{k}{p.suffix}" if where else p, d, ext)
                   for p, k, d in zip(found.paths, found.keys, found.defaults)]
    else:
        prompts = list(found.defaults)
    masks = find_masks(mask_dir, found.keys) if mask_dir is not None else None
    return ImageSet(found.paths, prompts, resolution, center_crop, random_flip, seed, masks, images=found.images,
                    repeats=found.repeats, buckets=buckets, caption_rules=caption_rules)


def load_training_images(cfg: Any, prompt: str, *, captions: bool = False,
                         caption_dir: str | Path | None = None) -> ImageSet:
    """The instance images of a training job, from the data options every job shares.

    Reads ``cfg``'s data options (:class:`difflora.train.options.DataOptions`): the source
    (``instance_data_dir`` or ``dataset_name``), resolution, crops and flips (``cache_latents``
    implies centre crops, so each image has one latent), masks, repeats, buckets and captions.
    Setting ``caption_extension`` turns caption reading on. ``prompt`` is the caption of images
    that have none.
    """
    buckets = (Buckets.make(cfg.resolution, cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_reso_steps)
               if cfg.bucket else None)
    rules = CaptionRules(cfg.caption_dropout_rate, cfg.shuffle_caption, cfg.keep_tokens)
    center = cfg.center_crop or cfg.cache_latents
    if cfg.dataset_name:
        from difflora.data.hf_datasets import load_dataset_images

        found = load_dataset_images(cfg.dataset_name, cfg.dataset_config_name, cfg.image_column,
                                    cfg.caption_column, prompt, cfg.repeats, getattr(cfg, "cache_dir", None))
        masks = find_masks(cfg.mask_dir, found.keys) if cfg.mask_dir else None
        return ImageSet(found.paths, found.defaults, cfg.resolution, center, cfg.random_flip, cfg.seed, masks,
                        images=found.images, repeats=found.repeats, buckets=buckets, caption_rules=rules)
    return load_image_set(cfg.instance_data_dir, prompt, cfg.resolution, center_crop=center,
                          random_flip=cfg.random_flip, captions=captions or cfg.caption_extension is not None,
                          seed=cfg.seed, caption_dir=caption_dir, mask_dir=cfg.mask_dir,
                          caption_ext=cfg.caption_extension, repeats=cfg.repeats, buckets=buckets,
                          caption_rules=rules)
