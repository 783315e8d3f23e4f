"""The novel instances the base world never draws (`shapes.NOVEL`), and the concepts trained from them.

Each is new as a combination of things the model can draw, as a real concept is for Stable
Diffusion; its reference pictures are the instance rendered a little moved and resized.
"""
from __future__ import annotations

import random
from dataclasses import replace

from .shapes import COLOURS, Scene, styled

INSTANCES = {
    "striped-ball": dict(scene=styled(Scene("red", "circle", "blue"), pattern="striped"),  # white stripes
                         class_word="circle", example="a <striped-ball> on a green background"),
    "holed-star": dict(scene=Scene("orange", "star", "purple", pattern="holed"),
                       class_word="star", example="a <holed-star> on a white background"),
}


def object_colours(scene: Scene) -> set[str]:
    """The colours the object itself shows: its colour, and a striped one's second colour."""
    return {scene.colour} | ({scene.second_colour} if scene.pattern == "striped" else set())


def references(name: str, n: int = 6, backgrounds: int = 1) -> list[Scene]:
    """The instance's `n` reference pictures. `backgrounds` > 1 photographs it in that many places,
    as a user's photos of one object are: its own background, then others the instance's seeded draw
    picks among the colours that are none of the instance's own, in turn."""
    rng = random.Random(sum(map(ord, name)))
    base = INSTANCES[name]["scene"]
    others = sorted(c for c in COLOURS if c != base.background and c not in object_colours(base))
    places = [base.background] + random.Random(len(name)).sample(others, backgrounds - 1)
    return [replace(base, background=places[i % len(places)], cx=rng.uniform(-0.1, 0.1),
                    cy=rng.uniform(-0.1, 0.1), radius=rng.uniform(0.5, 0.6)) for i in range(n)]
