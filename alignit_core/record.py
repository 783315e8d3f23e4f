"""What one request produced (`Generation`), the settings JSON that reproduces it, the files it
is written to, and the `python -m alignit_core generate` line that makes it again. The demo and
the CLI both write through here.
"""
from __future__ import annotations

import json
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from . import __version__
from .concepts import Concept
from .conditioning import Row
from .prompts import Prompt, SwapPlan
from .settings import Settings, to_args, to_record

# What each row of a generation is called wherever people see it (the demo's columns, the grid)
CAPTIONS = {"customized": "customized baseline", "alignit": "AlignIT", "base": "base model on p",
            "baseline": "baseline", "swapped": "swapped"}
MODES = ("alignit", "swap")


@dataclass(frozen=True)
class Request:
    """What was asked, as the engine read it."""

    mode: str  # "alignit" (concept mode) | "swap"
    prompt: str  # as typed, whitespace collapsed
    p: Prompt  # what the AlignIT / swapped row generates from
    sources: tuple[tuple[SwapPlan, Concept | None], ...]  # each p' with the model whose rows it gives
    customized: Prompt | None = None  # concept mode: the prompt as the customization reads it
    swaps: tuple[tuple[str | int, str], ...] = ()  # swap mode: (word or position, source) as given

    @property
    def concepts(self) -> list[Concept]:
        return [c for _, c in self.sources if c is not None]


@dataclass
class Generation:
    """What one request produced, and everything needed to reproduce it."""

    images: dict[str, Image.Image]  # row -> image, in batch order
    maps: dict[str, np.ndarray]  # row -> (tokens, side, side) attention probabilities, mean over layers, steps, heads
    tokens: dict[str, tuple]  # row -> its Token table
    swapped: dict[str, tuple[int, ...]]  # row -> swapped positions
    settings: Settings  # resolved: no None left
    request: Request
    batch: list[Row]  # the rows as denoised: prompt, customization and swap plans of each
    model: dict = field(default_factory=dict)  # name, source, accelerations of the model that made it
    map_store_bytes: int = 0  # size of the running attention sums (constant in the number of steps)
    latents: dict[str, torch.Tensor] = field(default_factory=dict)  # row -> final latent z0 (C, h, w), CPU
    warnings: list[str] = field(default_factory=list)  # e.g. tokens dropped by truncation

    @property
    def rows(self) -> list[str]:
        return list(self.images)

    @property
    def mode(self) -> str:
        return self.request.mode

    def record(self) -> dict:
        """The settings JSON: what was asked, how it was sampled, each row's token table, versions."""
        req, p = self.request, self.request.p
        out = {"model": self.model.get("source"), "model_name": self.model.get("name"), "mode": req.mode}
        if p.parts:
            out["segments"] = [part.text for part in p.parts]
        elif p.dropped:
            out["dropped"] = p.dropped
        out.update({"prompt": req.prompt, "p": p.text, "p_dummy": " | ".join(plan.source.text for plan, _ in req.sources),
                    "positions": list(self.swapped[self.rows[-1] if req.mode == "swap" else "alignit"])})
        if req.mode == "alignit":
            out["customized_prompt"] = req.customized.text
            out["concept"] = described(req.concepts[0])
            out["concepts"] = [{**described(c), "p_dummy": plan.source.text, "positions": list(plan.positions)}
                               for plan, c in req.sources]
        else:
            out["swaps"] = [[t, s] for t, s in req.swaps]
        out.update(to_record(self.settings))
        out.update({"warnings": list(self.warnings), "rows": self.rows,
                    "accelerations": list(self.model.get("accelerations", ())),
                    "token_tables": {row.name: [asdict(t) for t in row.prompt.tokens] for row in self.batch},
                    "versions": versions()})
        return out

    def settings_json(self) -> str:
        return json.dumps(self.record(), indent=2, ensure_ascii=False)


def described(c: Concept) -> dict:
    return {"name": c.name, "token": c.token, "class_word": c.class_word, "kind": c.kind,
            **({"scale": c.scale} if c.kind == "lora" else {})}


def versions() -> dict:
    import diffusers
    import transformers

    return {"alignit": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}


# ------------------------------------------------------------------------------ reproducing

def command(gen: Generation, concept_args: list[str] | None = None, extra: list[str] = ()) -> str:
    """The `python -m alignit_core generate` line that makes `gen` again. `concept_args`: how each
    concept is named on the command line (default: its name, as under assets/concepts); `extra`:
    further arguments (e.g. `--token` of an uploaded file)."""
    req = gen.request
    args = ["python", "-m", "alignit_core", "generate", "--model", gen.model.get("source", "auto"),
            "--prompt", req.prompt]
    if req.mode == "alignit":
        for arg in concept_args or [c.name for c in req.concepts]:
            args += ["--concept", arg]
        args += list(extra)
        scales = {c.scale for c in req.concepts if c.kind == "lora"} - {1.0}
        if scales:
            args += ["--lora-scale", f"{scales.pop():g}"]
        args += ["--positions", *map(str, gen.swapped["alignit"])]
        if "base" in gen.rows:
            args.append("--base")
    else:
        args += [a for target, source in req.swaps for a in ("--swap", f"{target}={source}")]
    return shlex.join(args + to_args(gen.settings) + ["--out", "out/"])


# ------------------------------------------------------------------------------ files

def write_outputs(gen: Generation, out: Path, prefix: str = "") -> list[Path]:
    """Write into `out`, each name starting with `prefix`: the row PNGs, heatmaps.png (the comparison
    grid, columns named as in the demo, word-level maps), maps.safetensors and settings.json. Every
    PNG carries the settings. Returns the paths."""
    from visualize import comparison_grid, heatmap_row

    from .maps import MAPS_FILE, entries, entry_maps, save_maps

    out.mkdir(parents=True, exist_ok=True)
    record = gen.record()
    meta = PngInfo()
    meta.add_text("alignit", json.dumps(record, ensure_ascii=False))
    written = []
    for name, image in gen.images.items():
        image.save(out / f"{prefix}{name}.png", pnginfo=meta)
        written.append(out / f"{prefix}{name}.png")
    columns = []
    for name, image in gen.images.items():
        row = None
        if name in gen.maps:
            words = entries(gen.tokens[name])
            lines = -(-len(words) // 8)  # as few lines as 8 tiles a line need, filled evenly
            marked = {i for i, e in enumerate(words) if set(e.positions) & set(gen.swapped.get(name, ()))}
            row = heatmap_row(image, entry_maps(gen.maps[name], words), [e.label for e in words], marked=marked,
                              per_line=-(-len(words) // lines))
        columns.append((CAPTIONS[name], image, row))
    s = gen.settings
    footer = (f"model {record['model']} · seed {s.seed} · steps {s.steps} · guidance {s.guidance} · "
              f"size {s.size} · {s.scheduler}\np: {record['p']}\np': {record['p_dummy']} · "
              f"positions {record['positions']}")
    comparison_grid(columns, record["prompt"], footer).save(out / f"{prefix}heatmaps.png", pnginfo=meta)
    written.append(out / f"{prefix}heatmaps.png")
    if gen.maps:
        written.append(save_maps(gen, out / f"{prefix}{MAPS_FILE}"))
    (out / f"{prefix}settings.json").write_text(gen.settings_json() + "\n")
    return written + [out / f"{prefix}settings.json"]
