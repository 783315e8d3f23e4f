"""How to sample: `Settings`, its checks, and the one table that spells each setting for the CLI,
the settings JSON and the "reproduce" line.

    settings = resolve(model, Settings(seed=3, swap_kv="v"))   # defaults filled, every value checked
    to_args(settings)  # ["--seed", "3", ..., "--swap-kv", "v"]: what `generate` needs to do it again

A new setting is a field of `Settings` (with its check in `resolve` if it has limits) and one
`Option` in `OPTIONS`; the parser, the JSON record and the reproduce line are made from that table.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, replace

from .errors import SettingsError

SCHEDULERS = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "euler": "EulerDiscreteScheduler",
              "dpm++": "DPMSolverMultistepScheduler"}
MAX_STEPS = 150
MAX_GUIDANCE = 30.0
MAX_SEED = 2**32 - 1
SWAP_KV = ("kv", "k", "v")  # swap keys and values, keys only, values only
LONG_MODES = ("segments", "truncate", "refuse")  # what to do with a prompt over 75 tokens
MAP_BLOCKS = ("down", "mid", "up")  # the denoiser's parts whose cross-attention layers can record maps


@dataclass(frozen=True)
class Settings:
    """How to sample. None means the model's default."""

    seed: int = 0
    steps: int | None = None
    guidance: float | None = None
    size: int | None = None
    scheduler: str | None = None
    swap_uncond: bool = False  # also write K'/V' into the unconditional CFG half
    swap_start: float = 0.0  # fraction of the steps in which the swap is applied
    swap_end: float = 1.0
    map_resolution: int | None = None
    record_maps: bool = True
    map_start: float = 0.0  # fraction of the steps from which attention maps are recorded
    map_end: float = 1.0  # ... until which
    map_blocks: tuple[str, ...] = MAP_BLOCKS  # the denoiser's parts whose layers (at map_resolution) record
    long_prompt: str = "segments"  # over 75 tokens: segments (LongAlign) | truncate | refuse
    swap_kv: str = "kv"  # which swapped rows: keys and values | k (keys only) | v (values only)
    swap_strength: float = 1.0  # 0: the row's own keys/values (no swap) .. 1: the swapped ones
    lora_rest: float = 0.0  # AlignIT on a LoRA: how much of the LoRA beyond the concept's keys/values (0: none)


def scheduler_names() -> list[str]:
    return list(SCHEDULERS)


# ------------------------------------------------------------------------------ the one mapping

@dataclass(frozen=True)
class Option:
    """One setting as people write it: a CLI flag and a key of the settings JSON. A pair option
    (`--swap-steps START END`) sets two fields."""

    names: tuple[str, ...]  # the Settings field(s)
    flag: str
    key: str  # in the settings JSON
    help: str
    type: type = str
    choices: tuple | None = None


OPTIONS = (
    Option(("seed",), "--seed", "seed", "the seed of the initial noise", int),
    Option(("steps",), "--steps", "steps", "denoising steps (default: the model's)", int),
    Option(("guidance",), "--guidance", "guidance", "classifier-free guidance scale", float),
    Option(("size",), "--size", "size", "image side in pixels (default: the model's own)", int),
    Option(("scheduler",), "--scheduler", "scheduler", "the sampler", str, tuple(SCHEDULERS)),
    Option(("swap_uncond",), "--swap-uncond", "swap_uncond", "swap in both CFG halves", bool),
    Option(("swap_start", "swap_end"), "--swap-steps", "swap_steps", "fractions of the steps in which to swap",
           float),
    Option(("swap_kv",), "--swap-kv", "swap_kv", "swap keys and values (kv), keys only (k) or values only (v)",
           str, SWAP_KV),
    Option(("swap_strength",), "--swap-strength", "swap_strength",
           "0 = the row's own keys/values (no swap) .. 1 = the full swap", float),
    Option(("lora_rest",), "--lora-rest", "lora_rest", "AlignIT on a LoRA: how much of the LoRA beyond the "
           "concept's keys and values (0: the paper's AlignIT .. 1: all of it)", float),
    Option(("long_prompt",), "--long-prompt", "long_prompt",
           "prompts over 75 tokens: segments (LongAlign, every word kept), truncate, refuse", str, LONG_MODES),
    Option(("map_resolution",), "--map-resolution", "map_resolution", "side of the attention maps to record", int),
    Option(("map_blocks",), "--map-blocks", "map_blocks",
           "the denoiser's parts whose cross-attention layers (at --map-resolution) record maps", str, MAP_BLOCKS),
    Option(("map_start", "map_end"), "--map-steps", "map_steps", "fractions of the steps over which maps are "
           "recorded", float),
)
DEFAULTS = Settings()


def add_arguments(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    """Every option (or those whose flag is in `only`) as an argument of `parser`, defaulting to
    Settings' defaults."""
    for o in OPTIONS:
        if only is not None and o.flag not in only:
            continue
        default = [getattr(DEFAULTS, n) for n in o.names]
        if o.type is bool:
            parser.add_argument(o.flag, action="store_true", help=o.help)
        elif len(o.names) == 2:
            parser.add_argument(o.flag, type=o.type, nargs=2, default=tuple(default), metavar=("START", "END"),
                                help=o.help)
        elif isinstance(default[0], tuple):
            parser.add_argument(o.flag, type=o.type, nargs="+", choices=o.choices, default=list(default[0]),
                                help=o.help)
        else:
            parser.add_argument(o.flag, type=o.type, choices=o.choices, default=default[0], help=o.help)


def from_args(args: argparse.Namespace) -> Settings:
    """The Settings an `add_arguments` parser read."""
    values = {}
    for o in OPTIONS:
        given = getattr(args, o.flag[2:].replace("-", "_"))
        if len(o.names) == 2:
            values.update(zip(o.names, given))
        else:
            values[o.names[0]] = tuple(given) if isinstance(given, list) else given
    return Settings(**values)


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def to_record(s: Settings) -> dict:
    """The settings JSON's entries for `s` (pairs as [start, end])."""
    out = {}
    for o in OPTIONS:
        values = [_plain(getattr(s, n)) for n in o.names]
        out[o.key] = values if len(values) == 2 else values[0]
    return out


def from_record(record: dict) -> Settings:
    """Settings from a settings JSON (what `to_record` wrote; keys it lacks keep their defaults)."""
    values = {}
    for o in OPTIONS:
        if o.key not in record:
            continue
        if len(o.names) == 2:
            values.update(zip(o.names, record[o.key]))
        else:
            v = record[o.key]
            values[o.names[0]] = tuple(v) if isinstance(v, list) else v
    return Settings(**values)


def _text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def to_args(s: Settings) -> list[str]:
    """CLI arguments that give `s` again: the sampling options always, the others where they
    differ from the defaults."""
    always = {"seed", "steps", "guidance", "size", "scheduler", "swap_start", "map_resolution"}
    out = []
    for o in OPTIONS:
        values = [getattr(s, n) for n in o.names]
        if any(v is None for v in values) or \
                (not always & set(o.names) and values == [getattr(DEFAULTS, n) for n in o.names]):
            continue
        if o.type is bool:
            out += [o.flag] if values[0] else []
        elif isinstance(values[0], tuple):
            out += [o.flag, *map(str, values[0])]
        else:
            out += [o.flag, *map(_text, values)]
    return out


# ------------------------------------------------------------------------------ checks

def _whole(x, low: int, high: int) -> bool:
    return not isinstance(x, bool) and isinstance(x, int) and low <= x <= high


def is_seed(x) -> bool:
    """A whole number from 0 to MAX_SEED (a bool is not one)."""
    return _whole(x, 0, MAX_SEED)


def _number(x, low: float, high: float) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x) and low <= x <= high


def resolve(model, s: Settings) -> Settings:
    """`s` with the model's defaults filled in, every value checked; the model's family refuses
    what it cannot honour (SD3/Flux: UNet schedulers, swap_uncond, ...). Raises SettingsError."""
    family = model.family
    defaults = family.defaults()
    steps = defaults.steps if s.steps is None else s.steps
    guidance = defaults.guidance if s.guidance is None else s.guidance
    size = model.native_size if s.size is None else s.size
    if not is_seed(s.seed):
        raise SettingsError(f"seed must be a whole number from 0 to {MAX_SEED}")
    if not _whole(steps, 1, MAX_STEPS):
        raise SettingsError(f"steps must be a whole number from 1 to {MAX_STEPS}")
    if not _number(guidance, 0, MAX_GUIDANCE):
        raise SettingsError(f"guidance must be a finite number from 0 to {MAX_GUIDANCE:g}")
    low, cap = family.size_range()
    if isinstance(size, bool) or not isinstance(size, int) or size % 8 or not low <= size <= cap:
        raise SettingsError(f"size must be a multiple of 8 from {low} to {cap} pixels")
    if size % model.size_step:
        raise SettingsError(f"size must be a multiple of {model.size_step} for this model")
    family.check(s, size)
    names = family.schedulers
    scheduler = s.scheduler or next((k for k in names if SCHEDULERS[k] == model.scheduler_name), names[0])
    if scheduler not in SCHEDULERS:
        raise SettingsError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    if not (0 <= s.swap_start < s.swap_end <= 1):
        raise SettingsError("the swap step range must satisfy 0 <= start < end <= 1")
    maps = family.maps
    res = s.map_resolution or maps.default_resolution(size)
    if res not in maps.resolutions(size):
        raise SettingsError(f"no cross-attention layer works at {res}x{res}; "
                            f"available: {', '.join(map(str, maps.resolutions(size)))}")
    blocks = tuple(b for b in MAP_BLOCKS if b in (s.map_blocks or ()))
    if isinstance(s.map_blocks, str) or not blocks or len(blocks) != len(s.map_blocks):
        raise SettingsError(f"heat-map layers must be some of {', '.join(MAP_BLOCKS)}, got {s.map_blocks!r}")
    if s.record_maps and not maps.layers(res, size, blocks):
        there = sorted({b for b in MAP_BLOCKS if maps.layers(res, size, (b,))}, key=MAP_BLOCKS.index)
        raise SettingsError(f"no cross-attention layer of the {' or '.join(blocks)} block(s) works at {res}x{res}; "
                            f"at that resolution choose {', '.join(there)}")
    if not (0 <= s.map_start < s.map_end <= 1):
        raise SettingsError("the heat-map step range must satisfy 0 <= start < end <= 1")
    if round(s.map_start * steps) == round(s.map_end * steps):
        raise SettingsError(f"the heat-map step range {s.map_start:g}..{s.map_end:g} holds none of the {steps} steps; "
                            f"widen it")
    if s.long_prompt not in LONG_MODES:
        raise SettingsError(f"unknown long-prompt mode {s.long_prompt!r}; choose one of {', '.join(LONG_MODES)}")
    if s.swap_kv not in SWAP_KV:
        raise SettingsError(f"swap {s.swap_kv!r} is not one of {', '.join(SWAP_KV)} (keys and values, keys only, "
                            f"values only)")
    if not _number(s.swap_strength, 0, 1):
        raise SettingsError("the swap strength must be a number from 0 (no swap) to 1 (the full swap)")
    if not _number(s.lora_rest, 0, 1):
        raise SettingsError("the rest of the LoRA must be a number from 0 (the paper's AlignIT) to 1 (all of the "
                            "LoRA but the other tokens' keys and values)")
    return replace(s, steps=steps, guidance=float(guidance), size=size, scheduler=scheduler, map_resolution=res,
                   swap_strength=float(s.swap_strength), lora_rest=float(s.lora_rest), map_blocks=blocks)

