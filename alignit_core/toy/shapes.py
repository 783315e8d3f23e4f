"""The embedded model's procedural world: coloured shapes on coloured backgrounds.

Three things live here because they must agree with each other exactly: the renderer the
embedded model was trained on, the captions it was trained with, and the deterministic pixel
classifier that judges what a generated image shows. Rendering is batched torch (it runs on the
GPU during training); classification is numpy.
"""
from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, replace

import numpy as np
import torch

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 60, 180),
    "orange": (245, 120, 20),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "star")
PATTERNS = ("striped", "holed")
IMAGE_SIZE = 128

# How a caption names a pattern: "a blue striped square", "a green star with a hole".
PATTERN_PHRASES = {"plain": "{s}", "striped": "striped {s}", "holed": "{s} with a hole"}

# (colour, shape, pattern) the world never draws, whatever the background: the concepts' novel
# instances (a red-and-white striped circle, an orange star with a hole). Their parts all occur.
NOVEL: frozenset[tuple[str, str, str]] = frozenset({("red", "circle", "striped"), ("orange", "star", "holed")})

# (colour, shape, background) combinations the model never sees in training; the quality test
# generates exactly these. Chosen so that every colour, shape and background still occurs in
# training on its own.
HELD_OUT: tuple[tuple[str, str, str], ...] = (
    ("red", "triangle", "green"), ("green", "star", "white"), ("blue", "circle", "yellow"),
    ("yellow", "square", "purple"), ("purple", "circle", "orange"), ("orange", "triangle", "black"),
    ("white", "star", "red"), ("black", "square", "blue"), ("red", "star", "yellow"),
    ("green", "square", "orange"), ("blue", "triangle", "white"), ("yellow", "circle", "black"),
    ("purple", "star", "green"), ("orange", "square", "blue"), ("white", "circle", "purple"),
    ("black", "triangle", "red"),
)

TEMPLATES = (
    "a {c} {s} on a {b} background",
    "a photo of a {c} {s} on a {b} background",
    "a {c} {s}",
    "a photo of a {c} {s}",
    "a {s} on a {b} background",
)


@dataclass(frozen=True)
class Scene:
    """One picture of the world: what is drawn, and where."""

    colour: str
    shape: str
    background: str
    cx: float = 0.0  # centre and radius in [-1, 1] image coordinates
    cy: float = 0.0
    radius: float = 0.55
    pattern: str = "plain"  # "plain" | "striped" | "holed"
    second_colour: str = "white"  # the other stripe colour of a striped object

    def caption(self, template: str = TEMPLATES[0]) -> str:
        return pattern_template(template, self.pattern).format(c=self.colour, s=self.shape, b=self.background)


def pattern_template(template: str, pattern: str) -> str:
    """The template with the shape word replaced by the pattern's phrase."""
    return template.replace("{s}", PATTERN_PHRASES[pattern])


def stripe_colour(colour: str, background: str) -> str:
    """A striped object's second colour, fixed by its colour and background so that the caption
    says everything the picture shows: white, or black/yellow where white is taken."""
    return next(c for c in ("white", "black", "yellow") if c not in (colour, background))


def styled(scene: Scene, **changes) -> Scene:
    """`dataclasses.replace` that keeps a striped scene's second colour consistent."""
    out = replace(scene, **changes)
    return replace(out, second_colour=stripe_colour(out.colour, out.background)) if out.pattern == "striped" else out


def training_triples() -> list[tuple[str, str, str]]:
    held = set(HELD_OUT)
    return [t for t in itertools.product(COLOURS, SHAPES, COLOURS)
            if t[0] != t[2] and t not in held]


def random_scene(rng: random.Random, triple: tuple[str, str, str] | None = None, patterned: float = 0.0,
                 excluded: frozenset[tuple[str, str, str]] = NOVEL) -> Scene:
    """A training scene; with probability `patterned` striped or holed (never an `excluded`
    (colour, shape, pattern), by default the NOVEL ones)."""
    colour, shape, background = triple or rng.choice(training_triples())
    scene = Scene(colour, shape, background, cx=rng.uniform(-0.12, 0.12),
                  cy=rng.uniform(-0.12, 0.12), radius=rng.uniform(0.45, 0.62))
    if patterned and rng.random() < patterned:
        pattern = rng.choice([p for p in PATTERNS if (colour, shape, p) not in excluded])
        scene = styled(scene, pattern=pattern)
    return scene


# ---------------------------------------------------------------- rendering (signed distances)

def _sd_triangle(px: torch.Tensor, py: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Equilateral triangle pointing up with circumradius r (image y grows downwards)."""
    k = math.sqrt(3.0)
    a = r * k / 2  # half the side length
    x = px.abs() - a
    y = -py + a / k
    swap = x + k * y > 0
    x2 = torch.where(swap, (x - k * y) / 2, x)
    y2 = torch.where(swap, (-k * x - y) / 2, y)
    x2 = x2 - torch.clamp(x2, -2 * a, torch.zeros_like(x2))
    return -torch.sqrt(x2 * x2 + y2 * y2) * torch.sign(y2)


def _sd_star(px: torch.Tensor, py: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Five-pointed star, one point up, outer radius r: polygon distance over its 10 edges."""
    angles = [(-math.pi / 2) + i * math.pi / 5 for i in range(10)]
    radii = [1.0 if i % 2 == 0 else 0.42 for i in range(10)]
    verts = [(rad * math.cos(a), rad * math.sin(a)) for rad, a in zip(radii, angles)]
    d = None
    inside = torch.zeros_like(px, dtype=torch.bool)
    for i in range(10):
        (x0, y0), (x1, y1) = verts[i], verts[(i + 1) % 10]
        x0t, y0t, x1t, y1t = x0 * r, y0 * r, x1 * r, y1 * r
        ex, ey = x1t - x0t, y1t - y0t
        wx, wy = px - x0t, py - y0t
        t = ((wx * ex + wy * ey) / (ex * ex + ey * ey)).clamp(0, 1)
        dist = torch.sqrt((wx - ex * t) ** 2 + (wy - ey * t) ** 2)
        d = dist if d is None else torch.minimum(d, dist)
        crosses = ((y0t <= py) & (py < y1t)) | ((y1t <= py) & (py < y0t))
        xint = x0t + (py - y0t) * ex / torch.where(ey.abs() < 1e-9, torch.full_like(ey, 1e-9), ey)
        inside ^= crosses & (px < xint)
    return torch.where(inside, -d, d)


def _sdf(shape: str, px, py, r):
    if shape == "circle":
        return torch.sqrt(px * px + py * py) - r
    if shape == "square":
        return torch.maximum(px.abs(), py.abs()) - r * 0.82
    if shape == "triangle":
        return _sd_triangle(px, py - r * 0.18, r * 1.08)
    if shape == "star":
        return _sd_star(px, py + r * 0.05, r * 1.12)
    raise ValueError(f"unknown shape {shape!r}")


# Each shape's vertical extent (top, bottom) in units of its radius, as _sdf draws it: stripes are
# five equal bands over it, the object's own colour on the outer and middle ones, so that colour
# covers more than half of any striped shape.
_EXTENT = {"circle": (-1.0, 1.0), "square": (-0.82, 0.82), "triangle": (-0.9, 0.72),
           "star": (-1.17, 1.12 * math.sin(math.radians(54)) - 0.05)}


def _palette(names: list[str], device) -> torch.Tensor:
    return torch.tensor([COLOURS[n] for n in names], dtype=torch.float32, device=device) / 127.5 - 1


def render(scenes: list[Scene], size: int = IMAGE_SIZE, device="cpu") -> torch.Tensor:
    """Render scenes to a float tensor (N, 3, size, size) in [-1, 1], anti-aliased."""
    n = len(scenes)
    coords = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size * 2 - 1
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")
    cx = torch.tensor([s.cx for s in scenes], device=device).view(n, 1, 1)
    cy = torch.tensor([s.cy for s in scenes], device=device).view(n, 1, 1)
    r = torch.tensor([s.radius for s in scenes], device=device).view(n, 1, 1)
    px, py = gx - cx, gy - cy  # (n, size, size)
    d = torch.empty_like(px)
    for shape in set(s.shape for s in scenes):
        idx = torch.tensor([i for i, s in enumerate(scenes) if s.shape == shape], device=device)
        d[idx] = _sdf(shape, px[idx], py[idx], r[idx])
    holed = torch.tensor([s.pattern == "holed" for s in scenes], device=device).view(n, 1, 1)
    hole = torch.sqrt(px * px + py * py) - r * 0.3
    d = torch.where(holed, torch.maximum(d, -hole), d)
    pixel = 2.0 / size
    alpha = (0.5 - d / pixel).clamp(0, 1).unsqueeze(1)  # (n, 1, size, size)
    bg = _palette([s.background for s in scenes], device).view(n, 3, 1, 1)
    fg = _palette([s.colour for s in scenes], device).view(n, 3, 1, 1)
    second = _palette([s.second_colour for s in scenes], device).view(n, 3, 1, 1)
    stripes = torch.tensor([s.pattern == "striped" for s in scenes], device=device).view(n, 1, 1, 1)
    top = torch.tensor([_EXTENT[s.shape][0] for s in scenes], device=device).view(n, 1, 1) * r
    height = torch.tensor([_EXTENT[s.shape][1] - _EXTENT[s.shape][0] for s in scenes], device=device).view(n, 1, 1) * r
    band = (((py - top) / (height / 5)).floor() % 2 == 1).unsqueeze(1)  # 5 bands over the shape's height
    fg_img = torch.where(stripes & band, second, fg)
    return bg * (1 - alpha) + fg_img * alpha


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


# ---------------------------------------------------------------- the pixel classifier

_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)
_NAMES = list(COLOURS)


def _nearest(pixels: np.ndarray) -> np.ndarray:
    d = ((pixels[:, None, :].astype(np.float32) - _PALETTE[None]) ** 2).sum(-1)
    return d.argmin(1)


def _template_masks(size: int) -> dict[str, np.ndarray]:
    scenes = [Scene("white", s, "black", radius=0.6) for s in SHAPES]
    alpha = render(scenes, size)[:, 0].numpy() > 0
    return dict(zip(SHAPES, alpha))


_TEMPLATE_CACHE: dict[int, dict[str, np.ndarray]] = {}


def _crop_to_box(mask: np.ndarray, out: int = 32) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.float32)
    t = torch.from_numpy(box)[None, None]
    return torch.nn.functional.interpolate(t, size=(out, out), mode="area")[0, 0].numpy() > 0.5


def _enclosed(mask: np.ndarray) -> np.ndarray:
    """Pixels outside `mask` that the image border cannot reach without crossing it (its holes)."""
    outside = ~mask
    reach = np.zeros_like(mask)
    reach[0], reach[-1], reach[:, 0], reach[:, -1] = outside[0], outside[-1], outside[:, 0], outside[:, -1]
    while True:
        grown = reach.copy()
        grown[1:] |= reach[:-1]
        grown[:-1] |= reach[1:]
        grown[:, 1:] |= reach[:, :-1]
        grown[:, :-1] |= reach[:, 1:]
        grown &= outside
        if np.array_equal(grown, reach):
            return outside & ~reach
        reach = grown


@dataclass(frozen=True)
class Judgement:
    """What the classifier sees in one image."""

    background: str
    colour: str | None  # the object's dominant colour, None when no object is found
    shape: str | None
    shape_iou: float
    colour_shares: dict[str, float]  # fraction of object pixels nearest to each colour
    hole: bool  # the object encloses background, or its centre shows the background

    @property
    def words(self) -> str:
        """What the picture shows, in the world's words: `orange star with a hole on yellow`; every colour
        over a fifth of the object, the most first (`red and white circle on blue`: a striped ball, as
        Table 1's fidelity reads one; the classifier does not see where the colours lie); `nothing on blue`."""
        if self.shape is None:
            return f"nothing on {self.background}"
        colours = [self.colour] + [c for c, share in sorted(self.colour_shares.items(), key=lambda kv: -kv[1])
                                   if c != self.colour and share >= 0.2]
        return f"{' and '.join(colours)} {self.shape}{' with a hole' if self.hole else ''} on {self.background}"


def _segment(image: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """(background colour index, each pixel's nearest colour index (H*W,), object mask (H, W)):
    the background is the border's commonest colour; the object, pixels clearly not it."""
    h, w, _ = image.shape
    border = np.concatenate([image[:2].reshape(-1, 3), image[-2:].reshape(-1, 3),
                             image[:, :2].reshape(-1, 3), image[:, -2:].reshape(-1, 3)])
    bg_idx = int(np.bincount(_nearest(border), minlength=len(_NAMES)).argmax())
    flat = image.reshape(-1, 3).astype(np.float32)
    nearest = _nearest(flat)
    dist_bg = np.sqrt(((flat - _PALETTE[bg_idx]) ** 2).sum(-1))
    return bg_idx, nearest, ((nearest != bg_idx) & (dist_bg > 40)).reshape(h, w)


def object_mask(image: np.ndarray) -> np.ndarray:
    """The object's silhouette in an (H, W, 3) uint8 image, its holes filled: (H, W) bool. What
    the object words drew; the rest is what the background words drew."""
    mask = _segment(image)[2]
    return mask | _enclosed(mask)


def classify(image: np.ndarray) -> Judgement:
    """Judge an (H, W, 3) uint8 image of the shapes world, deterministically."""
    h, w, _ = image.shape
    bg_idx, nearest, mask = _segment(image)
    background = _NAMES[bg_idx]
    if mask.sum() < 0.01 * h * w:
        return Judgement(background, None, None, 0.0, {}, False)
    labels = nearest[mask.reshape(-1)]
    counts = np.bincount(labels, minlength=len(_NAMES)).astype(np.float64)
    shares = {n: float(c / counts.sum()) for n, c in zip(_NAMES, counts) if c > 0}
    colour = _NAMES[int(counts.argmax())]
    # shape: the object's silhouette, holes filled, against each template, both box-normalised
    # A hole: background enclosed by the object (>= 3 % of its filled area), or background at the
    # object's centre (a hole that a blurred edge opened to the outside, as generated ones often are).
    enclosed = _enclosed(mask)
    filled = mask | enclosed
    ys, xs = np.nonzero(mask)
    cy, cx = int(ys.mean()), int(xs.mean())
    open_centre = not mask[max(cy - 2, 0):cy + 3, max(cx - 2, 0):cx + 3].any()
    hole = bool(enclosed.sum() >= 0.03 * filled.sum()) or open_centre
    if open_centre:
        rr = max(2, int(0.12 * (ys.max() - ys.min())))
        filled[max(cy - rr, 0):cy + rr + 1, max(cx - rr, 0):cx + rr + 1] = True
    templates = _TEMPLATE_CACHE.setdefault(h, {k: _crop_to_box(v) for k, v in _template_masks(h).items()})
    obs = _crop_to_box(filled)
    ious = {k: float((obs & t).sum() / max((obs | t).sum(), 1)) for k, t in templates.items()}
    shape = max(ious, key=ious.get)
    return Judgement(background, colour, shape, ious[shape], shares, hole)
