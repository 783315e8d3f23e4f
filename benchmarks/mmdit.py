"""Side-stream AlignIT on SD3 / Flux against the plain diffusers pipelines, in one process.

    python benchmarks/mmdit.py                      # CPU: the tiny random-weight SD3 (+T5) and Flux pipelines
    python benchmarks/mmdit.py --full --steps 10    # GPU: SD3.5-medium / Flux-dev shapes, random weights, bf16, 1024 px
    python benchmarks/mmdit.py --only embedded --steps 20   # the shipped embedded MMDiT model, 128 px

Each time is the median of --reps repetitions after one warm-up, the two sides alternating, same
pipeline, scheduler, steps, size and seed:

  alignit / plain     one AlignIT image (the swapped row alone) / one plain pipeline image
  pair / 2 plain      baseline + AlignIT in one batch (maps on) / two plain pipeline images
  maps on / off       the pair with heat maps recorded / without
  side / main tokens  text tokens the side stream puts through each block / tokens of the main batch
  map store MB        the running sums of the maps (constant in the number of steps)

On CUDA it also prints seconds per image and the peak GPU memory of the pair against a plain image.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a shared CPU, spinning threads made the tiny
# pipelines' AlignIT call 20x slower than the plain one measured just before it. Read when torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from alignit_core.families import EMBEDDED_MMDIT_DEFAULTS  # noqa: E402
from alignit_core.families.mmdit import MMDiTModel, MMDiTSettings, MMDiTSwap, generate_mmdit  # noqa: E402
from alignit_core.models import EMBEDDED_MMDIT  # noqa: E402
from alignit_core.testing import tiny_flux, tiny_sd3  # noqa: E402
from bench import alternate  # noqa: E402  (run as a script, benchmarks/ is on the path)

PROMPT, SOURCE, DOG = "a photo of a dog", "* * * * cat", {"sd3": 5, "flux": 4}


def measure(name: str, pipe, size: int, steps: int, rows: int, reps: int) -> dict:
    model = MMDiTModel.from_pipeline(pipe)
    family = model.family
    settings = MMDiTSettings(seed=0, steps=steps, size=size, text_tokens=rows)
    swap = [MMDiTSwap((DOG[family],), SOURCE)]

    def plain():
        pipe(PROMPT, num_inference_steps=steps, height=size, width=size, max_sequence_length=rows,
             generator=torch.Generator().manual_seed(0), output_type="pil")

    one, t_plain = alternate(lambda: generate_mmdit(model, PROMPT, swap, settings, include_baseline=False), plain, reps)
    pair, t_plain2 = alternate(lambda: generate_mmdit(model, PROMPT, swap, settings), plain, reps)
    no_maps = MMDiTSettings(seed=0, steps=steps, size=size, text_tokens=rows, record_maps=False)
    maps_on, maps_off = alternate(lambda: generate_mmdit(model, PROMPT, swap, settings),
                                  lambda: generate_mmdit(model, PROMPT, swap, no_maps), reps)
    gen = generate_mmdit(model, PROMPT, swap, settings)
    out = {"pipeline": name, "size": size, "steps": steps, "blocks": model.blocks,
           "alignit/plain": one / t_plain, "pair/2 plain": pair / (2 * t_plain2), "maps on/off": maps_on / maps_off,
           "side tokens": gen.side_tokens, "main tokens": gen.main_tokens,
           "side/main tokens": gen.side_tokens / gen.main_tokens,
           "map store MB": sum(m.nbytes for m in gen.text_maps.values()) / 2**20, "plain s": t_plain, "pair s": pair}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        plain()
        plain_peak = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        generate_mmdit(model, PROMPT, swap, settings)
        out.update({"plain peak GB": plain_peak / 2**30, "pair peak GB": torch.cuda.max_memory_allocated() / 2**30})
    return out


def embedded_mmdit(device: str):
    """The shipped embedded MMDiT model as a plain diffusers pipeline (fp32)."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(str(EMBEDDED_MMDIT), text_encoder_3=None, tokenizer_3=None,
                                                    dtype=torch.float32).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="SD3.5-medium and Flux-dev shapes, bf16, 1024 px (GPU)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default 4 tiny, 28 full)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions per side (default 5 tiny, 2 full)")
    ap.add_argument("--only", choices=["sd3", "sd3_t5", "flux", "embedded"], action="append",
                    help="pipelines to measure")
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.full and device != "cuda":
        ap.error("--full builds multi-billion-parameter models: run it on a GPU")
    steps = args.steps or (28 if args.full else 4)
    reps = args.reps or (2 if args.full else 5)
    dtype = torch.bfloat16 if args.full else torch.float32
    builders = {"sd3": lambda: tiny_sd3(full=args.full, dtype=dtype, device=device),
                "sd3_t5": lambda: tiny_sd3(t5=True, full=args.full, dtype=dtype, device=device),
                "flux": lambda: tiny_flux(full=args.full, dtype=dtype, device=device),
                "embedded": lambda: embedded_mmdit(device)}
    names = args.only or (["sd3", "flux"] if args.full else ["sd3", "sd3_t5", "flux"])  # full SD3 always has T5
    size, rows = (1024, {"sd3": 256, "sd3_t5": 256, "flux": 512}) if args.full else (32, {"sd3": 16, "sd3_t5": 16,
                                                                                          "flux": 24})
    results = []
    for name in names:
        pipe = builders[name]()
        if name == "embedded":  # its own size and text rows (one zero row where T5 would be)
            results.append(measure(name, pipe, 128, steps, EMBEDDED_MMDIT_DEFAULTS.text_rows, reps))
        else:
            results.append(measure(name, pipe, size, steps, rows[name], reps))
        del pipe
        if device == "cuda":
            torch.cuda.empty_cache()
    cols = ["pipeline", "alignit/plain", "pair/2 plain", "maps on/off", "side tokens", "main tokens",
            "side/main tokens", "map store MB"] + (["plain peak GB", "pair peak GB"] if device == "cuda" else [])
    print(f"{device}, {steps} steps, {size} px (the embedded model: 128), median of {reps}")
    print(" | ".join(f"{c:>16}" for c in cols))
    for r in results:
        print(" | ".join(f"{r[c]:>16.3f}" if isinstance(r[c], float) else f"{r[c]:>16}" for c in cols))
    if args.json:
        args.json.write_text(json.dumps({"device": device, "torch": torch.__version__, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
