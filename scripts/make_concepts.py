"""Regenerate assets/concepts/ from the seed: `python scripts/make_concepts.py [--seed 2024] [--out DIR]`.

Writes, per concept, 0.png .. 4.png (64x64), a caption 0.txt .. 4.txt beside each image and a
concept.json with the trigger word, class word and new-context prompts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from difflora.toy.concepts import CONCEPTS, DEFAULT_SEED, N_IMAGES, concept_images


def write_concepts(out: Path, seed: int = DEFAULT_SEED, n: int = N_IMAGES) -> list[Path]:
    written = []
    for name, concept in CONCEPTS.items():
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, (image, caption) in enumerate(concept_images(name, seed, n)):
            image.save(folder / f"{i}.png", optimize=True)
            (folder / f"{i}.txt").write_text(caption + "\n")
            written.append(folder / f"{i}.png")
        meta = {"name": name, "trigger": concept.trigger, "class_word": concept.class_word,
                "instance_prompt": f"a {concept.subject()}", "description": concept.description,
                "new_context_prompts": list(concept.new_contexts), "seed": seed, "images": n}
        (folder / "concept.json").write_text(json.dumps(meta, indent=2) + "\n")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "assets" / "concepts")
    args = parser.parse_args()
    files = write_concepts(args.out, args.seed)
    print(f"wrote {len(files)} images to {args.out}")


if __name__ == "__main__":
    main()
