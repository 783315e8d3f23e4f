"""The novel instances the base world never draws (`shapes.NOVEL`), and the concepts trained from them.

Each is new as a combination of things the model can draw, as a real concept is for Stable
Diffusion; its reference pictures are the instance rendered a little moved and resized.
"""
from __future__ import annotations

import random
from dataclasses import replace

from .shapes import Scene, styled

INSTANCES = {
    "striped-ball": dict(scene=styled(Scene("red", "circle", "blue"), pattern="striped"),  # white stripes
                         class_word="circle", example="a <striped-ball> on a green background"),
    "holed-star": dict(scene=Scene("orange", "star", "purple", pattern="holed"),
                       class_word="star", example="a <holed-star> on a white background"),
}


def references(name: str, n: int = 6) -> list[Scene]:
    rng = random.Random(sum(map(ord, name)))
    base = INSTANCES[name]["scene"]
    return [replace(base, cx=rng.uniform(-0.1, 0.1), cy=rng.uniform(-0.1, 0.1), radius=rng.uniform(0.5, 0.6))
            for _ in range(n)]
