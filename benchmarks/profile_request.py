"""Where one comparison's time goes: torch.profiler over baseline + AlignIT + heat maps.

    python benchmarks/profile_request.py                  # embedded model, CPU, 20 steps
    python benchmarks/profile_request.py --model tiny --steps 10 --rows 25

Prints the top operators by self time and the share of the request spent in AlignIT's own work
(text encodings, swap rows) and in the cross-attention layers (where the request's K/V are
projected once and the maps recorded) against the whole request.
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from alignit_core import Settings, generate_swap, load_model
from alignit_core import attention, conditioning
from alignit_core.models import from_components


def _labelled(module, name: str, label: str):
    """Wrap module.name so its calls show up as `label` in the profile."""
    fn = getattr(module, name)

    def wrapped(*a, **k):
        with record_function(label):
            return fn(*a, **k)
    setattr(module, name, wrapped)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded", help="embedded | tiny")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rows", type=int, default=15)
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    if args.model == "tiny":
        from alignit_core.testing import build_tiny_sd

        model, prompt, swaps = from_components(build_tiny_sd(), "tiny-sd"), "a jumping dog", [("dog", "zebra")]
    else:
        model, prompt, swaps = load_model(args.model, device="cpu"), "a red circle on a blue background", [
            ("red", "yellow")]
    _labelled(conditioning, "encode_prompts", "alignit: text encodings")
    _labelled(conditioning, "request_kv", "alignit: swap rows into the conditioning")
    _labelled(model.family, "decode", "vae decode")
    _labelled(attention, "_alignit_attention", "cross-attention (request K/V, SDPA, map recording)")
    settings = Settings(seed=0, steps=args.steps)
    generate_swap(model, prompt, swaps, settings)  # warm-up
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else []),
                 record_shapes=False) as prof:
        with record_function("request"):
            generate_swap(model, prompt, swaps, settings)
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    total = next(e for e in events if e.key == "request").cpu_time_total
    print(f"request {total / 1e6:.3f} s on {model.name}, {args.steps} steps, 2 rows (+ CFG halves)")
    for e in sorted((e for e in events if e.key.startswith(("alignit:", "vae", "cross-attention"))),
                    key=lambda e: -e.cpu_time_total):
        print(f"  {e.key:<40} {e.cpu_time_total / 1e6:8.3f} s  {e.cpu_time_total / total:7.2%}  ({e.count} calls)")


if __name__ == "__main__":
    main()
