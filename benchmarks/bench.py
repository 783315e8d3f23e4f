"""AlignIT against plain diffusers, measured in the same process run.

    python benchmarks/bench.py                    # CPU: embedded model + tiny SD-1.5-shaped model
    python benchmarks/bench.py --reps 7 --json out.json

Each figure is a ratio of medians over --reps repetitions after one warm-up, the two sides
alternating, same model, scheduler, steps, size and seed:

  R1 AlignIT overhead    one AlignIT image / one plain StableDiffusionPipeline image      (<= 1.03)
  R2 comparison cost     baseline + AlignIT + heatmaps (one call) / two plain calls       (<= 1.05 CPU, 0.75 GPU)
  R3 heatmap overhead    swap with maps recorded / swap without maps                      (<= 1.10)
  R4 map memory          bytes of the map store at 50 steps / at 5 steps                  (1.0)
  R5 request set-up      prompt handling + K'/V' precompute / whole request               (<= 1 %)
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from alignit_core import Settings, generate_swap, load_model, word_swap_plan  # noqa: E402
from alignit_core.generate import encode_prompt, _uncond  # noqa: E402
from alignit_core.kv import RowWrite, layer_writes  # noqa: E402
from alignit_core.models import EMBEDDED, from_components  # noqa: E402

TARGETS = {"R1": 1.03, "R2": 1.05, "R3": 1.10, "R4": 1.0, "R5": 0.01}


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def alternate(a, b, reps: int) -> tuple[float, float]:
    a(), b()  # warm-up
    ta, tb = [], []
    for _ in range(reps):
        ta.append(timed(a))
        tb.append(timed(b))
    return statistics.median(ta), statistics.median(tb)


def setup_time(model, prompt, swaps) -> float:
    """Prompt handling + text encodings + K'/V' rows: everything before the first UNet step."""
    def run():
        plan = word_swap_plan(model.tokenizer, prompt, swaps)
        cond, _ = encode_prompt(model, plan.target, None)
        src, _ = encode_prompt(model, plan.source, None)
        _uncond(model, None)
        layer_writes(model.cross_attention_layers, [RowWrite((1,), plan.positions, src)])
        return cond
    with torch.no_grad():
        run()
        return statistics.median(timed(run) for _ in range(5))


def bench(name, model, pipe, prompt, swaps, steps, reps) -> dict:
    size = model.native_size
    plain_kw = dict(num_inference_steps=steps, guidance_scale=7.5, height=size, width=size)
    s_maps = Settings(seed=0, steps=steps, guidance=7.5)
    s_nomaps = Settings(seed=0, steps=steps, guidance=7.5, record_maps=False)

    def plain():
        pipe(prompt, generator=torch.Generator("cpu").manual_seed(0), **plain_kw)

    def alignit_one():
        generate_swap(model, prompt, swaps, s_nomaps, include_baseline=False)

    def comparison():
        generate_swap(model, prompt, swaps, s_maps)

    def two_plain():
        plain(), plain()

    def swap_maps():
        generate_swap(model, prompt, swaps, s_maps, include_baseline=False)

    t_align, t_plain = alternate(alignit_one, plain, reps)
    t_cmp, t_two = alternate(comparison, two_plain, reps)
    t_maps, t_nomaps = alternate(swap_maps, alignit_one, reps)
    few = generate_swap(model, prompt, swaps, Settings(seed=0, steps=5)).map_store_bytes
    many = generate_swap(model, prompt, swaps, Settings(seed=0, steps=50)).map_store_bytes
    t_setup = setup_time(model, prompt, swaps)
    return {"model": name, "size": size, "steps": steps,
            "seconds": {"plain": t_plain, "alignit": t_align, "comparison": t_cmp, "two_plain": t_two,
                        "swap_maps": t_maps, "swap_nomaps": t_nomaps, "setup": t_setup},
            "R1": t_align / t_plain, "R2": t_cmp / t_two, "R3": t_maps / t_nomaps, "R4": many / few,
            "R5": t_setup / t_align, "map_store_bytes": {"5": few, "50": many}}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    from diffusers import StableDiffusionPipeline
    from conftest import build_tiny_sd

    torch.set_grad_enabled(False)
    runs = []
    plain_embedded = StableDiffusionPipeline.from_pretrained(EMBEDDED, torch_dtype=torch.float32,
                                                             safety_checker=None, requires_safety_checker=False)
    plain_embedded.set_progress_bar_config(disable=True)
    runs.append(bench("embedded-shapes (128 px)", load_model("embedded", device="cpu"), plain_embedded,
                      "a red circle on a blue background", [("red", "yellow")], args.steps, args.reps))
    tiny_plain = build_tiny_sd()
    tiny_plain.set_progress_bar_config(disable=True)
    runs.append(bench("tiny SD-1.5-shaped (64 px)", from_components(build_tiny_sd(), "tiny-sd"), tiny_plain,
                      "a jumping dog", [("dog", "zebra")], args.steps, args.reps))
    import diffusers
    info = {"device": "cpu", "threads": torch.get_num_threads(), "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "date": time.strftime("%Y-%m-%d"),
            "reps": args.reps, "runs": runs}
    print(f"device cpu ({info['threads']} threads), torch {torch.__version__}, diffusers {diffusers.__version__}, "
          f"{info['date']}, median of {args.reps}")
    print(f"{'model':<28} {'R1':>6} {'R2':>6} {'R3':>6} {'R4':>5} {'R5':>7}   plain s/img")
    for r in runs:
        print(f"{r['model']:<28} {r['R1']:>6.3f} {r['R2']:>6.3f} {r['R3']:>6.3f} {r['R4']:>5.2f} {r['R5']:>7.2%}"
              f"   {r['seconds']['plain']:.3f}")
    print(f"{'target':<28} {'<=1.03':>6} {'<=1.05':>6} {'<=1.10':>6} {'1.0':>5} {'<=1%':>7}")
    if args.json:
        args.json.write_text(json.dumps(info, indent=2))
    print(json.dumps(info))


if __name__ == "__main__":
    main()
