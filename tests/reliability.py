"""What the reliability tests share: the good request and what no request may change (the model's
fingerprint and that request's pixels), the app's Generate as its button calls it, and a run made
to fail mid-loop. Their fixtures (`one_thread_per_run`, `concepts`, `reference`) are in conftest.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

import app
from alignit_core import Settings, generate_swap

WIDTH = 32  # the tiny SD's text-encoder width
GOOD = ("a jumping dog", [("dog", "zebra")], Settings(seed=1, steps=2))


def fingerprint(model) -> tuple:
    """What no request may change: the installed attention processors (the same objects), the
    tokenizer's vocabulary, the text encoder's embedding table and the UNet's weights."""
    table = model.text_encoders[0].get_input_embeddings().weight
    unet_sum = sum(float(p.double().sum()) for p in model.unet.parameters())
    return (tuple((name, id(proc)) for name, proc in model.unet.attn_processors.items()), len(model.tokenizer),
            tuple(table.shape), float(table.double().sum()), unet_sum)


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else Image.open(image).convert("RGB"))


def good_pixels(model) -> list[np.ndarray]:
    gen = generate_swap(model, *GOOD)
    return [pixels(gen.images[row]) for row in gen.rows]


def assert_intact(model, reference) -> None:
    """The model is as loaded and the next good request gives the same pixels as before."""
    before, pixels_before = reference
    assert fingerprint(model) == before
    for a, b in zip(good_pixels(model), pixels_before, strict=True):
        assert np.array_equal(a, b)


def ui_generate(model, registry, **kw):
    """app.generate as the Generate button calls it, on the tiny SD, with `kw` changed."""
    values = dict(uploaded={}, mode=app.SWAP, concept_key=None, prompt="a jumping dog", positions=[],
                  swaps="dog=zebra", seed=1, steps=2, guidance=7.5, size=model.native_size, scheduler="ddim",
                  swap_uncond=False, swap_start=0.0, swap_end=1.0, map_resolution=None, include_base=False,
                  map_mode="overlay")
    values.update(kw)
    return app.generate(model, registry, **values, progress=lambda *a, **k: None)


def fail_at_step_1(error: BaseException):
    def on_kv(layer, step, key, value):
        if step == 1:
            raise error
    return on_kv
