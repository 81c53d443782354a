"""A seeded world of captioned coloured shapes, small enough to train on a laptop CPU.

Without a model hub the project needs an image domain where "did the model learn the concept?"
has a checkable answer. Every image here is a scene of one or two flat shapes on a plain
background, with a caption in plain words (mostly words the tiny tokenizer knows as single
tokens): ``"a large red circle on a white background"`` or
``"a blue star left of a green square on a black background"``. Scenes come from an integer seed
and an index, so any image can be regenerated without storing it.

Some (colour, shape) pairs are held out: they never appear in the ``train`` split, but every
colour and every shape does, so a model can be asked for combinations it has never seen.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "purple": (130, 40, 170),
    "orange": (245, 130, 20),
    "pink": (240, 90, 170),
    "brown": (120, 70, 30),
    "black": (15, 15, 15),
    "white": (250, 250, 250),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "grey": (128, 128, 128),
    "pale blue": (200, 220, 245),
    "pale green": (205, 235, 200),
    "pale yellow": (250, 243, 200),
    "pale pink": (248, 215, 225),
}
SIZES = {"small": (0.12, 0.17), "large": (0.25, 0.32)}  # radius as a fraction of the image side
RELATIONS = ("left of", "right of", "above", "below")
PATTERNS = ("striped", "dotted", "checkered")
# Unseen in training; each colour and shape here still appears in training with other partners.
HELD_OUT: tuple[tuple[str, str], ...] = (
    ("red", "star"), ("blue", "triangle"), ("green", "ring"),
    ("yellow", "cross"), ("purple", "circle"), ("orange", "square"),
)
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Shape:
    """One object: centre and radius are fractions of the image side (radius = half its extent)."""

    shape: str
    colour: str
    cx: float
    cy: float
    radius: float
    size: str | None = None  # the size word in the caption, if any
    pattern: str | None = None  # striped / dotted / checkered, painted with pattern_colour
    pattern_colour: str | None = None
    angle: float = 0.0  # degrees, for the star and square; captions ignore it

    @property
    def phrase(self) -> str:
        words = [self.size, self.pattern, self.colour, self.shape]
        if self.pattern and self.pattern_colour:
            words = [self.size, self.colour, "and", self.pattern_colour, self.pattern, self.shape]
        return " ".join(w for w in words if w)


@dataclass(frozen=True)
class Scene:
    """What one image shows; ``caption`` is the text a model is trained with."""

    objects: tuple[Shape, ...]
    background: str
    relation: str | None = None  # between objects[0] and objects[1]

    @property
    def caption(self) -> str:
        first = self.objects[0].phrase
        if self.relation is not None:
            second = self.objects[1].phrase
            first = f"{first} {self.relation} {article(second)} {second}"
        return f"{article(first)} {first} on a {self.background} background"


def article(phrase: str) -> str:
    return "an" if phrase[0] in "aeiou" else "a"


# ----------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------


def _polygon(cx: float, cy: float, radius: float, points: Sequence[tuple[float, float]], angle: float):
    a = math.radians(angle)
    ca, sa = math.cos(a), math.sin(a)
    return [(cx + radius * (x * ca - y * sa), cy + radius * (x * sa + y * ca)) for x, y in points]


def _star_points(inner: float = 0.45) -> list[tuple[float, float]]:
    pts = []
    for i in range(10):
        r = 1.0 if i % 2 == 0 else inner
        t = -math.pi / 2 + i * math.pi / 5
        pts.append((r * math.cos(t), r * math.sin(t)))
    return pts


def shape_mask(shape: str, cx: float, cy: float, radius: float, side: int, angle: float = 0.0) -> Image.Image:
    """An 'L' mask (255 inside) of one shape, drawn at ``side`` pixels; coordinates in pixels."""
    mask = Image.new("L", (side, side), 0)
    d = ImageDraw.Draw(mask)
    box = [cx - radius, cy - radius, cx + radius, cy + radius]
    if shape == "circle":
        d.ellipse(box, fill=255)
    elif shape == "ring":
        d.ellipse(box, fill=255)
        inner = radius * 0.55
        d.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
    elif shape == "square":
        s = 0.85  # a square of the same visual weight as the circle
        d.polygon(_polygon(cx, cy, radius, [(-s, -s), (s, -s), (s, s), (-s, s)], angle), fill=255)
    elif shape == "triangle":
        d.polygon(_polygon(cx, cy, radius, [(0, -1), (0.95, 0.75), (-0.95, 0.75)], angle), fill=255)
    elif shape == "star":
        d.polygon(_polygon(cx, cy, radius, _star_points(), angle), fill=255)
    elif shape == "cross":
        w = 0.33
        d.rectangle([cx - radius, cy - w * radius, cx + radius, cy + w * radius], fill=255)
        d.rectangle([cx - w * radius, cy - radius, cx + w * radius, cy + radius], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")
    return mask


def _pattern(pattern: str, side: int, period: float, a: tuple, b: tuple) -> Image.Image:
    """A full-size image of colour ``a`` with a ``b`` pattern on it."""
    img = Image.new("RGB", (side, side), a)
    d = ImageDraw.Draw(img)
    p = max(2.0, period)
    n = int(side / p) + 2
    if pattern == "striped":  # diagonal stripes
        for k in range(-n, 2 * n):
            x0 = k * p
            d.polygon([(x0, 0), (x0 + p / 2, 0), (x0 + p / 2 - side, side), (x0 - side, side)], fill=b)
    elif pattern == "checkered":
        for i in range(n):
            for j in range(n):
                if (i + j) % 2:
                    d.rectangle([i * p, j * p, (i + 1) * p - 1, (j + 1) * p - 1], fill=b)
    elif pattern == "dotted":
        for i in range(n):
            for j in range(n):
                x, y, r = (i + 0.5) * p, (j + 0.5) * p, p * 0.28
                d.ellipse([x - r, y - r, x + r, y + r], fill=b)
    else:
        raise ValueError(f"unknown pattern {pattern!r}; choose from {PATTERNS}")
    return img


def render(scene: Scene, size: int = 64, return_masks: bool = False):
    """Draw a scene (antialiased by supersampling). With ``return_masks`` also return one boolean
    array per object marking the pixels fully inside it, for pixel-statistics checks."""
    side = size * _SUPERSAMPLE
    img = Image.new("RGB", (side, side), BACKGROUNDS[scene.background])
    masks = []
    for obj in scene.objects:
        mask = shape_mask(obj.shape, obj.cx * side, obj.cy * side, obj.radius * side, side, obj.angle)
        if obj.pattern:
            fill = _pattern(obj.pattern, side, obj.radius * side * 0.5, COLOURS[obj.colour],
                            COLOURS[obj.pattern_colour or "white"])
        else:
            fill = Image.new("RGB", (side, side), COLOURS[obj.colour])
        img.paste(fill, (0, 0), mask)
        if return_masks:
            small = np.asarray(mask.resize((size, size), Image.BOX))
            masks.append(small >= 250)
    img = img.resize((size, size), Image.LANCZOS)
    return (img, masks) if return_masks else img


def nearest_colour(rgb: Sequence[float], palette: dict[str, tuple[int, int, int]] = COLOURS) -> str:
    """The palette name closest to an RGB value (Euclidean in RGB)."""
    v = np.asarray(rgb, dtype=np.float64)
    return min(palette, key=lambda k: float(((np.asarray(palette[k]) - v) ** 2).sum()))


def colour_fractions(image: Image.Image, mask: np.ndarray | None = None) -> dict[str, float]:
    """Fraction of (masked) pixels nearest to each named colour or background tint.

    A cheap judge of toy images: for a generated "red circle", the red fraction among pixels that
    are not background should dominate.
    """
    px = np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3)
    if mask is not None:
        px = px[np.asarray(mask).reshape(-1)]
    # Background and shape tints of the same name ("black", "white") count together.
    entries = [(k, v) for k, v in COLOURS.items()] + [(k, v) for k, v in BACKGROUNDS.items()]
    centres = np.asarray([v for _, v in entries], dtype=np.float64)
    nearest = ((px[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
    counts = np.bincount(nearest, minlength=len(entries)) / max(1, len(px))
    out = dict.fromkeys([k for k, _ in entries], 0.0)
    for (k, _), c in zip(entries, counts):
        out[k] += float(c)
    return out


# ----------------------------------------------------------------------------------------------
# Sampling scenes
# ----------------------------------------------------------------------------------------------


def contrasting_colours(background: str) -> list[str]:
    # A shape must stand out: no white on white / pale, no black on black.
    bad = {"white": {"white"}, "black": {"black"}, "grey": set()}.get(background, {"white"})
    return [c for c in COLOURS if c not in bad]


@dataclass
class ToyWorld:
    """Deterministic scenes: ``scene(i)`` depends only on (seed, split, i).

    ``split``: ``"train"`` never shows a held-out (colour, shape) pair; ``"held_out"`` shows at
    least one in every scene; ``"all"`` draws freely. ``relation_prob`` is the share of
    two-object scenes.
    """

    seed: int = 0
    size: int = 64
    split: str = "train"
    relation_prob: float = 0.3
    held_out: tuple[tuple[str, str], ...] = HELD_OUT
    shapes: tuple[str, ...] = SHAPES
    backgrounds: tuple[str, ...] = tuple(BACKGROUNDS)

    def __post_init__(self) -> None:
        if self.split not in ("train", "held_out", "all"):
            raise ValueError(f"split must be train, held_out or all, got {self.split!r}")

    def _pair(self, rng: random.Random, background: str, want_held: bool | None) -> tuple[str, str]:
        colours = contrasting_colours(background)
        pairs = [(c, s) for c in colours for s in self.shapes]
        held = set(self.held_out)
        if want_held is True:
            pairs = [p for p in pairs if p in held]
        elif want_held is False:
            pairs = [p for p in pairs if p not in held]
        return rng.choice(pairs)

    def scene(self, index: int) -> Scene:
        rng = random.Random(f"{self.seed}/{self.split}/{index}")
        background = rng.choice(self.backgrounds)
        exclude = False if self.split == "train" else None
        if rng.random() < self.relation_prob:
            rel = rng.choice(RELATIONS)
            first_held = True if self.split == "held_out" else exclude
            a = self._pair(rng, background, first_held)
            b = self._pair(rng, background, exclude)
            r1, r2 = rng.uniform(0.12, 0.19), rng.uniform(0.12, 0.19)
            near, far = rng.uniform(0.22, 0.3), rng.uniform(0.7, 0.78)
            across1, across2 = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7)
            p1, p2 = (near, far) if rel in ("left of", "above") else (far, near)
            if rel in ("left of", "right of"):
                c1, c2 = (p1, across1), (p2, across2)
            else:
                c1, c2 = (across1, p1), (across2, p2)
            objs = (Shape(a[1], a[0], *c1, r1, angle=rng.uniform(-15, 15)),
                    Shape(b[1], b[0], *c2, r2, angle=rng.uniform(-15, 15)))
            return Scene(objs, background, rel)
        colour, shape = self._pair(rng, background, True if self.split == "held_out" else exclude)
        size = rng.choice(tuple(SIZES))
        radius = rng.uniform(*SIZES[size])
        margin = radius + 0.03
        cx, cy = rng.uniform(margin, 1 - margin), rng.uniform(margin, 1 - margin)
        return Scene((Shape(shape, colour, cx, cy, radius, size=size, angle=rng.uniform(-15, 15)),), background)

    def sample(self, index: int) -> tuple[Image.Image, str]:
        scene = self.scene(index)
        return render(scene, self.size), scene.caption

    def prompts(self, n: int, start: int = 0) -> list[str]:
        """Captions of scenes ``start .. start+n-1`` (for evaluation prompts without images)."""
        return [self.scene(i).caption for i in range(start, start + n)]


def colour_shape_prompts(held_out_only: bool = False, background: str = "white") -> list[str]:
    """Every single-object '(colour) (shape)' prompt on one background, e.g. for CLIP retrieval."""
    held = set(HELD_OUT)
    out = []
    for c in contrasting_colours(background):
        for s in SHAPES:
            if held_out_only and (c, s) not in held:
                continue
            out.append(f"a {c} {s} on a {background} background")
    return out


class ToyDataset:
    """``n`` scenes of a :class:`ToyWorld` as a map-style dataset for a training loop.

    Items are ``{"pixel_values": float tensor (3, H, W) in [-1, 1], "caption": str}``, the
    layout diffusers training scripts use. No random flips: they would swap "left of" and
    "right of".
    """

    def __init__(self, world: ToyWorld, n: int) -> None:
        self.world, self.n = world, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        import torch

        if not 0 <= index < self.n:
            raise IndexError(index)
        image, caption = self.world.sample(index)
        arr = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
        return {"pixel_values": arr / 127.5 - 1.0, "caption": caption}
