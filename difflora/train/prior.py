"""Prior preservation: make sure the class folder holds enough images of the class.

Missing class images are generated with the base model (batched, with progress) and saved
beside any existing ones, which are always reused and never replaced: the folder is usually the
user's, and may already hold files named like ours (``class-00002.png``), so each new image takes
a name no file has yet and is linked into place without ever writing over one.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from difflora.data import IMAGE_EXTENSIONS

_TEMP = re.compile(r"^\.class-\d+\.tmp-(\d+)\.png$")


def class_images(folder: Path) -> list[Path]:
    """The images that count toward the class folder's total: those the loader reads (our temporaries aside)."""
    return [p for p in folder.iterdir()
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not _TEMP.match(p.name)]


def ensure_class_images(folder: Path, prompt: str, count: int, make_pipeline: Callable[[], Any], resolution: int,
                        seed: int, batch_size: int = 4, steps: int = 25) -> int:
    """Generate images until ``folder`` holds ``count``; return how many were generated."""
    folder.mkdir(parents=True, exist_ok=True)
    _remove_orphans(folder)
    start = len(class_images(folder))
    missing = count - start
    if missing <= 0:
        return 0
    pipe = make_pipeline()
    names = _free_names(folder)
    with tqdm(total=missing, desc="class images", unit="img") as bar:
        for first in range(0, missing, batch_size):
            n = min(batch_size, missing - first)
            generators = [torch.Generator().manual_seed(seed + start + first + i) for i in range(n)]
            images = pipe([prompt] * n, num_inference_steps=steps, generator=generators,
                          height=resolution, width=resolution).images
            for image in images:
                _save_new(image, folder, names)
            bar.update(n)
    return missing


def _free_names(folder: Path) -> Iterator[str]:
    """``class-NNNNN.png`` names whose stem no file in ``folder`` uses (a caption ``.txt`` included)."""
    taken = {p.stem.lower() for p in folder.iterdir()}
    k = 0
    while True:
        stem = f"class-{k:05d}"
        if stem not in taken:
            yield f"{stem}.png"
        k += 1


def _save_new(image: Any, folder: Path, names: Iterator[str]) -> Path:
    """Save ``image`` under the next free name; a file that appeared meanwhile is skipped, not replaced."""
    for name in names:
        path = folder / name
        tmp = folder / f".{path.stem}.tmp-{os.getpid()}.png"
        try:
            image.save(tmp)
            try:
                os.link(tmp, path)  # fails if the name exists: never writes over a file
            except FileExistsError:
                continue
            except OSError:  # a file system without hard links
                if path.exists():
                    continue
                os.replace(tmp, path)
            return path
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    raise AssertionError("unreachable: the name sequence is endless")


def _remove_orphans(folder: Path) -> None:
    """Temporary images of generations that were killed (their process is gone)."""
    for p in folder.iterdir():
        m = _TEMP.match(p.name)
        if m and int(m.group(1)) != os.getpid():
            try:
                os.kill(int(m.group(1)), 0)
            except ProcessLookupError:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            except PermissionError:
                pass
