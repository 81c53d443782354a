"""Training images from a ``datasets`` dataset (diffusers' ``--dataset_name``): a hub id or a
local folder (an ``imagefolder`` with a ``metadata.jsonl`` of captions, a saved dataset...).

Only the ``train`` split is read. Images are taken as their file bytes and decoded by
:func:`difflora.data.images.read_image`, so a dataset's images follow the rules of a folder's
(EXIF rotation, transparency on white, 16-bit scaled; unreadable rows skipped and named).
``datasets`` is imported here only, so ``--help`` and folder-based runs never load it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from difflora.data.images import UnreadableImage, read_image
from difflora.data.sources import Found
from difflora.errors import UserError

logger = logging.getLogger(__name__)


def _open(name: str, config_name: str | None, cache_dir: str | None) -> Any:
    try:
        import datasets
    except ImportError:
        raise UserError("--dataset_name needs the 'datasets' package: pip install datasets") from None
    try:
        return datasets.load_dataset(name, config_name, split="train", cache_dir=cache_dir)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"cannot load dataset '{name}' ({reason}); give a local folder of images with a "
                        "metadata.jsonl, or a dataset id already in the datasets cache") from None
    except Exception as err:  # datasets' own errors (DatasetNotFoundError, DataFilesNotFoundError, ...)
        if type(err).__module__.startswith("datasets"):
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UserError(f"cannot load dataset '{name}' ({reason})") from None
        raise


def _column(ds: Any, column: str, flag: str) -> None:
    if column not in ds.column_names:
        raise UserError(f"{flag} '{column}' is not a column of the dataset; its columns: "
                        f"{', '.join(ds.column_names)}")


def load_dataset_images(name: str, config_name: str | None, image_column: str, caption_column: str | None,
                        prompt: str, repeats: int = 1, cache_dir: str | None = None) -> Found:
    """Decode the ``train`` split's images (and captions from ``caption_column``; else ``prompt``).

    ``cache_dir``: where ``datasets`` keeps its downloads and Arrow files (default: its own cache).
    Each row's ``paths`` entry is its file path when the dataset has one, else ``row-N.png``;
    its key (for ``--mask_dir``) is that name without its suffix.
    """
    import datasets

    ds = _open(name, config_name, cache_dir)
    _column(ds, image_column, "--image_column")
    if caption_column is not None:
        _column(ds, caption_column, "--caption_column")
    if not isinstance(ds.features[image_column], datasets.Image):
        raise UserError(f"--image_column '{image_column}' holds {ds.features[image_column]}, not images; "
                        f"its columns: {', '.join(ds.column_names)}")
    ds = ds.cast_column(image_column, datasets.Image(decode=False))
    found, bad = Found(), []
    for i, row in enumerate(ds):
        cell = row[image_column] or {}
        path = Path(cell["path"]) if cell.get("path") else Path(f"row-{i}.png")
        try:
            if cell.get("bytes") is not None:
                image = read_image(path, "RGB", data=cell["bytes"])
            else:
                image = read_image(path, "RGB")
        except UnreadableImage as err:
            bad.append(f"row {i} '{path.name}' ({err.reason})")
            continue
        caption = str(row[caption_column] or "").strip() if caption_column is not None else ""
        found.paths.append(path)
        found.images.append(image)
        found.defaults.append(caption or prompt)
        found.repeats.append(repeats)
        found.keys.append(path.stem)
    if bad and found.paths:
        logger.warning("skipping %d unreadable image(s) of dataset '%s': %s", len(bad), name, "; ".join(bad))
    if not found.paths:
        raise UserError(f"dataset '{name}' has no readable image"
                        + (f" ({'; '.join(bad)})" if bad else " in its train split"))
    return found
