"""A long life: a hundred generations of every kind, with failures along the way, leave the model as
loaded, hold no tensor they made and keep resident memory flat.
"""
from __future__ import annotations

import gc
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from alignit_core import PromptError, Settings, generate_concept, generate_swap
from reliability import GOOD, fail_at_step_1, fingerprint

pytestmark = pytest.mark.usefixtures("one_thread_per_run")


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc")
def test_a_hundred_generations_leave_the_model_as_loaded_and_memory_flat(tiny_sd, concepts, reference):
    prompts = ["a jumping dog", "a red circle on a blue background", "banana in a white plate",
               "a small dog in the snow", "two cats on a green sofa"]
    sources = ["zebra", "yellow", "black", "tiger", "pink"]

    def request(i: int):
        s = Settings(seed=i, steps=2, scheduler=("ddim", "euler", "dpm++")[i % 3])
        kind = i % 4
        if kind == 0:
            return generate_swap(tiny_sd, prompts[i % 5], [(1 + i % 3, sources[i % 5])], s)
        if kind == 1:
            return generate_concept(tiny_sd, f"a photo of a <toy> number {i}", concepts.toy, s)
        if kind == 2:
            return generate_concept(tiny_sd, "a <new1> on the grass", concepts.cd, s, include_base=True)
        return generate_swap(tiny_sd, prompts[i % 5], [(3, sources[i % 5])], s)

    before, _ = reference
    rss, failures, t0 = [], 0, time.perf_counter()
    for i in range(100):
        request(i)
        if i % 10 == 5:  # failures along the way: a bad input and a run broken mid-loop
            with pytest.raises(PromptError):
                generate_swap(tiny_sd, "a jumping dog", [("cat", "zebra")], Settings(steps=2))
            with pytest.raises(RuntimeError):
                generate_swap(tiny_sd, *GOOD, on_kv=fail_at_step_1(RuntimeError("forced")))
            failures += 2
        gc.collect(1)  # the young generations: what a request leaves in cycles (a full pass costs 0.3 s here)
        rss.append(rss_kib())
        if i == 49:
            tensors_at_50 = live_tensors()
    elapsed = time.perf_counter() - t0
    tensors_at_100 = live_tensors()
    slope = float(np.polyfit(np.arange(50), np.array(rss[50:], dtype=float), 1)[0])
    print(f"\n100 generations (+{failures} failures) in {elapsed:.1f}s; RSS {rss[0] / 1024:.1f} -> "
          f"{rss[49] / 1024:.1f} -> {rss[-1] / 1024:.1f} MiB; slope over the last 50: {slope:+.1f} KiB/generation; "
          f"live tensors {tensors_at_50} -> {tensors_at_100}")
    assert fingerprint(tiny_sd) == before  # processors, tokenizer, embedding table, weights
    assert tensors_at_100 == tensors_at_50  # nothing a request made is still held
    assert slope < 50, f"resident memory grows {slope:.1f} KiB per generation"
