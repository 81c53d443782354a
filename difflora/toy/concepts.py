"""The concept image sets shipped in ``assets/concepts/``: objects the toy world never draws.

Each concept is a function of a seed: ``concept_images(name, seed)`` gives the same images every
time, and ``scripts/make_concepts.py`` writes them (``0.png``, ``0.txt``, ...) plus a
``concept.json`` describing the trigger word and prompts that put the concept in new contexts.

* ``checkered_star``: a star checkered in orange and purple, a pattern the world never uses
  (world stars are one flat colour). Trigger ``sks``, class word ``star``.
* ``robot``: a character made of parts: a blue square head with two yellow circle eyes, a red
  triangle body and two grey legs. Trigger ``ohwx``, class word ``robot``.

The two differ in colours, layout and class, so Mix-of-Show can fuse them and still tell them
apart.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from difflora.toy.world import BACKGROUNDS, COLOURS, Scene, Shape, article, render, shape_mask

CONCEPT_BACKGROUNDS = ("white", "grey", "pale blue", "pale green", "pale yellow")
N_IMAGES = 5
DEFAULT_SEED = 2024


@dataclass(frozen=True)
class Concept:
    name: str
    trigger: str
    class_word: str
    description: str
    new_contexts: tuple[str, ...]  # prompts putting the concept where its images never show it

    def subject(self) -> str:
        return f"{self.trigger} {self.class_word}"

    def caption(self, background: str) -> str:
        return f"{article(self.trigger)} {self.subject()} on a {background} background"


CONCEPTS: dict[str, Concept] = {
    "checkered_star": Concept(
        "checkered_star", "sks", "star", "a star checkered in orange and purple",
        ("a sks star on a black background", "a sks star left of a blue circle on a white background",
         "a sks star above a green square on a grey background", "a small sks star on a pale pink background"),
    ),
    "robot": Concept(
        "robot", "ohwx", "robot",
        "a blue square head with yellow circle eyes on a red triangle body with grey legs",
        ("an ohwx robot on a black background", "an ohwx robot right of a yellow star on a white background",
         "an ohwx robot below a red ring on a pale blue background",
         "a large ohwx robot on a pale pink background"),
    ),
}


def _draw_robot(background: str, size: int, cx: float, cy: float, scale: float) -> Image.Image:
    side = size * 4
    img = Image.new("RGB", (side, side), BACKGROUNDS[background])
    u = scale * side  # one unit: the robot is about 0.8 units tall

    def paste(shape: str, x: float, y: float, r: float, colour: str) -> None:
        mask = shape_mask(shape, cx * side + x * u, cy * side + y * u, r * u, side)
        img.paste(Image.new("RGB", (side, side), COLOURS[colour]), (0, 0), mask)

    d = ImageDraw.Draw(img)
    leg_w, leg_h = 0.05 * u, 0.16 * u
    for lx in (-0.09, 0.09):  # legs first, under the body
        x0 = cx * side + lx * u - leg_w / 2
        y0 = cy * side + 0.18 * u
        d.rectangle([x0, y0, x0 + leg_w, y0 + leg_h], fill=(128, 128, 128) if background != "grey" else (60, 60, 60))
    paste("triangle", 0.0, 0.08, 0.2, "red")  # body
    paste("square", 0.0, -0.22, 0.15, "blue")  # head
    for ex in (-0.06, 0.06):
        paste("circle", ex, -0.24, 0.04, "yellow")  # eyes
    return img.resize((size, size), Image.LANCZOS)


def concept_images(name: str, seed: int = DEFAULT_SEED, n: int = N_IMAGES, size: int = 64
                   ) -> list[tuple[Image.Image, str]]:
    """``n`` (image, caption) pairs of a concept: small changes of position, size and background."""
    if name not in CONCEPTS:
        raise ValueError(f"unknown concept {name!r}; choose from {sorted(CONCEPTS)}")
    concept = CONCEPTS[name]
    rng = random.Random(f"{seed}/{name}")
    out = []
    for i in range(n):
        background = CONCEPT_BACKGROUNDS[i % len(CONCEPT_BACKGROUNDS)]
        cx, cy = 0.5 + rng.uniform(-0.08, 0.08), 0.5 + rng.uniform(-0.08, 0.08)
        if name == "checkered_star":
            star = Shape("star", "orange", cx, cy, rng.uniform(0.3, 0.36), pattern="checkered",
                         pattern_colour="purple", angle=rng.uniform(-12, 12))
            image = render(Scene((star,), background), size)
        else:
            image = _draw_robot(background, size, cx, cy + 0.02, rng.uniform(0.9, 1.1))
        out.append((image, concept.caption(background)))
    return out
