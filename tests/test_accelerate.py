"""Optional speed-ups (torch.compile, channels-last) keep AlignIT's results and its per-request state."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from alignit_core import Settings, generate_swap, positions_plan, tokenize
from alignit_core.models import accelerate, from_components
from alignit_core.testing import build_tiny_sd

SWAP = ("a jumping dog", [("dog", "zebra")])


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def eager():
    model = from_components(build_tiny_sd(), "tiny-sd")
    return model, generate_swap(model, *SWAP, Settings(seed=0, steps=3))


def _same_as_eager(gen, ref):
    for row in ("baseline", "swapped"):
        assert np.abs(_pixels(gen.images[row]) - _pixels(ref.images[row])).max() <= 1
        np.testing.assert_allclose(gen.maps[row], ref.maps[row], atol=1e-4)
    assert gen.swapped == ref.swapped


def test_channels_last_gives_the_same_comparison(eager):
    _, ref = eager
    model = accelerate(from_components(build_tiny_sd(), "tiny-sd"), channels_last=True)
    assert model.accelerations == ("channels_last",)
    gen = generate_swap(model, *SWAP, Settings(seed=0, steps=3))
    _same_as_eager(gen, ref)
    assert gen.record()["accelerations"] == ["channels_last"]


def test_compiled_unet_keeps_swaps_exact_and_does_not_recompile_per_request(eager):
    """dynamo traces the UNet with the AlignIT processor in it (aot_eager: the same tracing as the
    default inductor backend, without its minutes of code generation on a CPU)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    _, ref = eager
    model = accelerate(from_components(build_tiny_sd(), "tiny-sd"), compile=True, backend="aot_eager")
    gen = generate_swap(model, *SWAP, Settings(seed=0, steps=3))
    _same_as_eager(gen, ref)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0, "nothing was compiled"
    # other prompt, other swap, other steps and seed: the same graphs serve it
    p = tokenize(model.tokenizer, "a red circle on a blue background")
    identity = generate_swap(model, p.text, plan=positions_plan(p, p, [2, 3]), settings=Settings(seed=5, steps=2))
    assert np.array_equal(_pixels(identity.images["baseline"]), _pixels(identity.images["swapped"]))
    other = generate_swap(model, "a red cat", [("cat", "dog"), ("red", "blue")], Settings(seed=1, steps=4))
    assert not np.array_equal(_pixels(other.images["baseline"]), _pixels(other.images["swapped"]))
    assert counters["stats"]["unique_graphs"] == graphs
    assert gen.record()["accelerations"] == ["compile:aot_eager"]
