"""The toy world: procedurally generated captioned shapes and the concept sets shipped with difflora."""

from difflora.toy.world import (
    BACKGROUNDS,
    COLOURS,
    HELD_OUT,
    RELATIONS,
    SHAPES,
    Scene,
    Shape,
    ToyDataset,
    ToyWorld,
    colour_fractions,
    colour_shape_prompts,
    render,
)

__all__ = [
    "BACKGROUNDS", "COLOURS", "HELD_OUT", "RELATIONS", "SHAPES", "Scene", "Shape", "ToyDataset", "ToyWorld",
    "colour_fractions", "colour_shape_prompts", "render",
]
