"""Prior preservation: make sure the class folder holds enough images of the class.

Missing class images are generated with the base model (batched, with progress) and saved
beside any existing ones, which are always reused and never replaced.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from difflora.data import IMAGE_EXTENSIONS


def ensure_class_images(folder: Path, prompt: str, count: int, make_pipeline, resolution: int, seed: int,
                        batch_size: int = 4, steps: int = 25) -> int:
    """Generate images until ``folder`` holds ``count``; return how many were generated."""
    folder.mkdir(parents=True, exist_ok=True)
    existing = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS]
    missing = count - len(existing)
    if missing <= 0:
        return 0
    pipe = make_pipeline()
    start = len(existing)
    with tqdm(total=missing, desc="class images", unit="img") as bar:
        for first in range(0, missing, batch_size):
            n = min(batch_size, missing - first)
            generators = [torch.Generator().manual_seed(seed + start + first + i) for i in range(n)]
            images = pipe([prompt] * n, num_inference_steps=steps, generator=generators,
                          height=resolution, width=resolution).images
            for i, image in enumerate(images):
                image.save(folder / f"class-{start + first + i:05d}.png")
            bar.update(n)
    return missing
