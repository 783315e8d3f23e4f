"""AlignIT against plain diffusers, measured in the same process run.

    python benchmarks/bench.py                       # CPU: embedded model + tiny SD-1.5-shaped model
    python benchmarks/bench.py --device cuda         # GPU: random-weight SD 1.5 (512 px) and SDXL (1024 px), fp16
    python benchmarks/bench.py --reps 7 --json out.json --compile --channels-last

Each figure is a ratio of medians over --reps repetitions after one warm-up, the two sides
alternating, same model, scheduler, steps, size and seed:

  R1 AlignIT overhead    one AlignIT image / one plain StableDiffusionPipeline image      (<= 1.03)
  R2 comparison cost     baseline + AlignIT + heatmaps (one call) / two plain calls       (<= 1.05 CPU, 0.75 GPU)
  R3 heatmap overhead    swap with maps recorded / swap without maps                      (<= 1.10)
  R4 map memory          bytes of the map store at 50 steps / at 5 steps                  (1.0)
  R5 request set-up      prompt handling + K'/V' precompute / whole request               (<= 1 %)

On CUDA it also prints seconds per comparison and peak GPU memory (torch.cuda.max_memory_allocated)
of one comparison against one and two plain calls. --compile / --channels-last apply the same
acceleration to both sides (alignit_core.models.accelerate and the plain pipeline's UNet).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from alignit_core import Settings, generate_swap, load_model, word_swap_plan
from alignit_core.conditioning import Row, condition
from alignit_core.settings import resolve
from alignit_core.models import EMBEDDED, accelerate, from_components

TARGETS = {"R1": 1.03, "R2": 1.05, "R3": 1.10, "R4": 1.0, "R5": 0.01}
GPU_TARGETS = {**TARGETS, "R2": 0.75}


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> float:
    _sync()
    t = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t


def alternate(a, b, reps: int) -> tuple[float, float]:
    a(), b()  # warm-up (and, with --compile, compilation)
    ta, tb = [], []
    for _ in range(reps):
        ta.append(timed(a))
        tb.append(timed(b))
    return statistics.median(ta), statistics.median(tb)


def peak(fn) -> int:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    return torch.cuda.max_memory_allocated()


def setup_time(model, prompt, swaps, settings) -> float:
    """Everything an AlignIT request does before its first UNet step (`conditioning.condition`: the
    text encodings of p and p' in one batch, the empty prompt, the swap rows written into the
    conditioning), plus the plan that tokenizes p and builds p'."""
    settings = resolve(model, settings)

    def run():
        plan = word_swap_plan(model.tokenizer, prompt, swaps)
        return condition(model, [Row("swapped", plan.target, swap=plan)], settings)
    with torch.no_grad():
        run()
        return statistics.median(timed(run) for _ in range(5))


def bench(name, model, pipe, prompt, swaps, steps, reps, size=None) -> dict:
    size = size or model.native_size
    plain_kw = dict(num_inference_steps=steps, guidance_scale=7.5, height=size, width=size)
    s_maps = Settings(seed=0, steps=steps, guidance=7.5, size=size)
    s_nomaps = Settings(seed=0, steps=steps, guidance=7.5, size=size, record_maps=False)

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
    few = generate_swap(model, prompt, swaps, Settings(seed=0, steps=5, size=size)).map_store_bytes
    many = generate_swap(model, prompt, swaps, Settings(seed=0, steps=50, size=size)).map_store_bytes
    t_setup = setup_time(model, prompt, swaps, s_nomaps)
    out = {"model": name, "size": size, "steps": steps,
           "seconds": {"plain": t_plain, "alignit": t_align, "comparison": t_cmp, "two_plain": t_two,
                       "swap_maps": t_maps, "swap_nomaps": t_nomaps, "setup": t_setup},
           "R1": t_align / t_plain, "R2": t_cmp / t_two, "R3": t_maps / t_nomaps, "R4": many / few,
           "R5": t_setup / t_align, "map_store_bytes": {"5": few, "50": many}}
    if torch.cuda.is_available() and model.device.type == "cuda":
        out["peak_bytes"] = {"comparison": peak(comparison), "plain": peak(plain), "two_plain": peak(two_plain)}
    return out


def _speedups(model, pipe, args):
    if args.compile or args.channels_last:
        accelerate(model, compile=args.compile, channels_last=args.channels_last)
        if args.channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
        if args.compile:
            pipe.unet.compile()
    return model, pipe


def cpu_runs(args) -> list[dict]:
    from alignit_core.testing import build_tiny_sd
    from diffusers import StableDiffusionPipeline

    runs = []
    if "embedded" in args.only:
        plain = StableDiffusionPipeline.from_pretrained(EMBEDDED, dtype=torch.float32, safety_checker=None,
                                                        requires_safety_checker=False)
        plain.set_progress_bar_config(disable=True)
        model, plain = _speedups(load_model("embedded", device="cpu"), plain, args)
        runs.append(bench("embedded-shapes (128 px)", model, plain, "a red circle on a blue background",
                          [("red", "yellow")], args.steps or 20, args.reps))
    if "tiny" in args.only:
        plain = build_tiny_sd()
        plain.set_progress_bar_config(disable=True)
        model, plain = _speedups(from_components(build_tiny_sd(), "tiny-sd"), plain, args)
        runs.append(bench("tiny SD-1.5-shaped (64 px)", model, plain, "a jumping dog", [("dog", "zebra")],
                          args.steps or 20, args.reps))
    return runs


def full_runs(args) -> list[dict]:
    """Full-size SD 1.5 / SDXL architectures, random weights (fp16 on CUDA)."""
    import fullsize

    dtype = torch.float16 if args.device == "cuda" else torch.float32
    runs = []
    for key, build, size, label in (("sd15", fullsize.sd15, 512, "SD 1.5 architecture"),
                                    ("sdxl", fullsize.sdxl, 1024, "SDXL architecture")):
        if key not in args.only:
            continue
        plain = build(args.device, dtype)
        plain.set_progress_bar_config(disable=True)
        model, plain = _speedups(from_components(build(args.device, dtype), key), plain, args)
        size = args.size or size
        runs.append(bench(f"{label} ({size} px)", model, plain, "a photo of a jumping dog in a park",
                          [("dog", "zebra")], args.steps or 30, args.reps, size))
        print(json.dumps(runs[-1]), flush=True)  # each model's figures as soon as they exist
        del model, plain
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return runs


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, help="default: 20 on CPU, 30 for the full-size models")
    ap.add_argument("--size", type=int, help="full-size models: image size (default 512 / 1024)")
    ap.add_argument("--only", nargs="+", default=None,
                    help="embedded tiny (CPU default) | sd15 sdxl (CUDA default; on CPU with --full)")
    ap.add_argument("--full", action="store_true", help="full-size architectures even on CPU (slow)")
    ap.add_argument("--compile", action="store_true", help="torch.compile both UNets")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    full = args.full or args.device == "cuda"
    args.only = args.only or (["sd15", "sdxl"] if full else ["embedded", "tiny"])
    torch.set_grad_enabled(False)
    runs = full_runs(args) if full else cpu_runs(args)
    import diffusers
    import transformers

    gpu = torch.cuda.get_device_name() if args.device == "cuda" else None
    info = {"device": gpu or "cpu", "threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "date": time.strftime("%Y-%m-%d"), "reps": args.reps, "compile": args.compile,
            "channels_last": args.channels_last, "runs": runs}
    targets = GPU_TARGETS if gpu else TARGETS
    print(f"device {info['device']} ({info['threads']} CPU threads), torch {torch.__version__}, diffusers "
          f"{diffusers.__version__}, {info['date']}, median of {args.reps}"
          + (", compiled" if args.compile else "") + (", channels-last" if args.channels_last else ""))
    print(f"{'model':<30} {'R1':>6} {'R2':>6} {'R3':>6} {'R4':>5} {'R5':>7}   plain s/img  comparison s")
    for r in runs:
        print(f"{r['model']:<30} {r['R1']:>6.3f} {r['R2']:>6.3f} {r['R3']:>6.3f} {r['R4']:>5.2f} {r['R5']:>7.2%}"
              f"   {r['seconds']['plain']:>11.3f}  {r['seconds']['comparison']:>12.3f}")
    print(f"{'target':<30} {'<=' + str(targets['R1']):>6} {'<=' + str(targets['R2']):>6} "
          f"{'<=' + str(targets['R3']):>6} {'1.0':>5} {'<=1%':>7}")
    for r in runs:
        if "peak_bytes" in r:
            p = {k: v / 2**30 for k, v in r["peak_bytes"].items()}
            print(f"{r['model']:<30} peak GiB: comparison {p['comparison']:.2f}, one plain {p['plain']:.2f}, "
                  f"two plain {p['two_plain']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(info, indent=2))
    print(json.dumps(info))


if __name__ == "__main__":
    main()
