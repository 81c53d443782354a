"""Captions: where they are read from, and how they vary from draw to draw.

A caption is read once (``name.txt`` beside its image, or in a caption folder); what the text
encoder then sees may change per draw: dropped to ``""`` (so the model also learns the
unconditional prediction that classifier-free guidance needs) or, for comma-separated tag
captions, with the tags after the first ``keep_tokens`` shuffled (so no tag owes its weight to
its position). Both are decided by a generator of ``(seed, epoch, example)``, like crops and
flips, so a resumed run sees the captions an uninterrupted one would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from difflora.config import read_text

DEFAULT_CAPTION_EXTENSION = ".txt"


def caption_extension(ext: str | None) -> str:
    """``--caption_extension`` as a suffix: ``None`` is ``.txt``, and ``caption`` means ``.caption``."""
    if not ext:
        return DEFAULT_CAPTION_EXTENSION
    return ext if ext.startswith(".") else f".{ext}"


def read_caption(image_path: Path, default: str, extension: str = DEFAULT_CAPTION_EXTENSION) -> str:
    """The caption in ``name<extension>`` beside the image (``name.txt`` by default), or ``default``."""
    txt = image_path.with_name(image_path.stem + extension)
    if txt.is_file():
        text = read_text(txt, "caption file").strip()
        if text:
            return text
    return default


def shuffle_tags(caption: str, keep_tokens: int, generator: torch.Generator) -> str:
    """Shuffle the comma-separated tags of ``caption`` after the first ``keep_tokens`` (kohya's rule).

    Tags are stripped and joined again with ``", "``; a caption without commas is one tag and
    comes back unchanged.
    """
    tags = [t.strip() for t in caption.strip().split(",")]
    fixed, rest = tags[:keep_tokens], tags[keep_tokens:]
    if len(rest) > 1:
        rest = [rest[i] for i in torch.randperm(len(rest), generator=generator).tolist()]
    return ", ".join(fixed + rest)


@dataclass(frozen=True)
class CaptionRules:
    """How a caption varies per draw: ``dropout_rate`` (replaced by ``""``), ``shuffle`` with ``keep_tokens``."""

    dropout_rate: float = 0.0
    shuffle: bool = False
    keep_tokens: int = 0

    @property
    def active(self) -> bool:
        return self.dropout_rate > 0 or self.shuffle

    def apply(self, caption: str, generator: torch.Generator) -> str:
        """The caption of one draw; ``generator`` is that draw's own (seeded by seed, epoch, example)."""
        if self.dropout_rate > 0 and float(torch.rand((), generator=generator)) < self.dropout_rate:
            return ""
        if self.shuffle:
            return shuffle_tags(caption, self.keep_tokens, generator)
        return caption
