"""The evaluation sweep (the paper's Table 1): customized baseline vs AlignIT over concepts x prompts x seeds.

    python -m alignit_core eval --dataset assets/eval/embedded.json --out out/eval
    accelerate launch --multi_gpu --num_processes 8 -m alignit_core eval \\
        --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --dataset customconcept101/dataset.json --concepts my-concepts/ --out out/cc101

The dataset is CustomConcept101's `dataset.json` (a list of {"class_prompt", "prompt_filename",
"instance_data_dir", ...}; `prompts/*.txt` hold one prompt a line with `{}` where the concept goes)
or a manifest in the same layout naming each entry's concept with a "concept" key
(assets/eval/embedded.json). An entry's concept is that key (a folder under assets/concepts, or a
path relative to the dataset file), else the folder `--concepts/<instance_data_dir's name>` (with
a manifest.json, or a bare learned_embeds file whose class word is the entry's class_prompt).

One job is (concept, prompt, seed): the customized baseline and AlignIT in one batched call, both
scored against p (the prompt with the concept replaced by its class word). A job's files
(images/<concept>/p<NN>-s<seed>/) are written once and reused by later runs into the same --out,
so an interrupted sweep picks up where it stopped. Jobs are split between processes by
`accelerate`'s PartialState; each job depends on nothing but its key, so 1 or N processes give the
same rows, merged (gathered to the main process) in job order into results.csv and summary.md.
On CPU, run every process with the same thread count (accelerate launch gives each one thread):
float rounding depends on it.

Bad input exits with status 2 and one `error:` line; nothing is written.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import AlignITError, ConceptError, PromptError

CONCEPTS = Path(__file__).resolve().parents[1] / "assets" / "concepts"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
METHODS = ("customized", "alignit")
LABELS = {"customized": "customized baseline", "alignit": "AlignIT"}
COLUMNS = ["concept", "kind", "prompt_index", "seed", "method", "prompt", "p", "mi", "mi_stderr", "clip_text",
           "clip_image", "overall", "image"]


@dataclass(frozen=True)
class Entry:
    """One concept of the dataset and its prompts."""

    name: str  # the job key's first part; unique in the dataset
    concept: object  # a Concept bound to the model
    prompts: tuple[str, ...]  # each with `{}` where the concept goes
    references: tuple[Path, ...]  # reference images for image alignment (may be empty)
    masks: tuple[Path, ...] | None = None  # one per reference: white = the concept


@dataclass(frozen=True, order=True)
class Job:
    concept: str
    prompt_index: int
    seed: int

    @property
    def folder(self) -> Path:
        return Path("images") / self.concept / f"p{self.prompt_index:02d}-s{self.seed}"


# ------------------------------------------------------------------------------ reading the dataset

def _images(folder: Path) -> tuple[Path, ...]:
    return tuple(sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)) if folder.is_dir() else ()


def _read_prompts(path: Path) -> tuple[str, ...]:
    if not path.is_file():
        raise PromptError(f"prompt file {path} not found")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = tuple(line for line in lines if line)
    for i, line in enumerate(prompts, 1):
        if line.count("{}") != 1:
            raise PromptError(f"{path.name}, prompt {i}: write {{}} once where the concept goes ({line!r})")
    if not prompts:
        raise PromptError(f"prompt file {path} holds no prompts")
    return prompts


def _concept_for(item: dict, index: int, root: Path, concepts: Path | None, model):
    from .concepts import load_concept

    if item.get("concept"):
        name = str(item["concept"])
        path = CONCEPTS / name if (CONCEPTS / name).is_dir() and not (root / name).exists() else root / name
        return Path(name).name, load_concept(path, model)
    if not item.get("instance_data_dir"):
        raise ConceptError(f"dataset entry {index} names no concept: add a \"concept\" key or an instance_data_dir")
    name = Path(item["instance_data_dir"]).name
    if concepts is None:
        raise ConceptError(f"dataset entry {index} ({name}) names no concept: give --concepts DIR with a folder "
                           f"{name}/ per concept, or add a \"concept\" key to the entry")
    folder = concepts / name
    if (folder / "manifest.json").is_file():
        return name, load_concept(folder, model)
    bare = [folder / f for f in ("learned_embeds.safetensors", "learned_embeds.bin") if (folder / f).is_file()]
    if not bare:
        raise ConceptError(f"no concept for dataset entry {name}: expected {folder}/manifest.json or "
                           f"{folder}/learned_embeds.safetensors")
    return name, load_concept(bare[0], model, class_word=item.get("class_prompt"))


def read_dataset(path: Path, model, concepts: Path | None = None, only: list[str] | None = None) -> list[Entry]:
    """The entries of a CustomConcept101-layout dataset file (or the folder holding dataset.json),
    their concepts loaded for `model`. Raises AlignITError (ConceptError, PromptError) for people."""
    path = Path(path)
    if path.is_dir():
        path = path / "dataset.json"
    if not path.is_file():
        raise AlignITError(f"no dataset file at {path}")
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AlignITError(f"{path.name} is not valid JSON ({e})") from None
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise AlignITError(f"{path.name} must be a list of entries (objects)")
    root = path.parent
    entries, seen = [], set()
    for index, item in enumerate(items, 1):
        if not isinstance(item.get("prompt_filename"), str):
            raise AlignITError(f"dataset entry {index} has no prompt_filename")
        name, concept = _concept_for(item, index, root, concepts, model)
        if only and name not in only:
            continue
        if name in seen:
            raise AlignITError(f"two dataset entries are named {name}; each concept may appear once")
        seen.add(name)
        refs = _images(root / item["instance_data_dir"]) if item.get("instance_data_dir") else ()
        refs = refs or tuple(concept.references)
        masks = None
        if item.get("mask_dir"):
            masks = tuple(root / item["mask_dir"] / f"{r.stem}.png" for r in refs)
            missing = [m.name for m in masks if not m.is_file()]
            if missing:
                raise AlignITError(f"{name}: no mask {missing[0]} in {item['mask_dir']}")
        entries.append(Entry(name, concept, _read_prompts(root / item["prompt_filename"]), refs, masks))
    if only:
        unknown = sorted(set(only) - seen)
        if unknown:
            raise AlignITError(f"--only {unknown[0]}: no such concept in the dataset")
    if not entries:
        raise AlignITError(f"{path.name} holds no entries")
    return entries


def plan(model, entries: list[Entry], prompts: int | None, seeds: int):
    """(jobs in key order, {(concept, prompt index): (prompt, p)}, [skipped (concept, index, reason)]).
    A prompt AlignIT cannot align (e.g. a two-token Custom Diffusion phrase at the very start) is
    skipped with the engine's reason; one over 75 tokens is read in segments."""
    jobs, texts, skipped = [], {}, []
    for e in entries:
        c = e.concept
        for i, line in enumerate(e.prompts[:prompts]):
            text = line.replace("{}", c.token)
            try:
                planned = model.family.concept_plan(text, c.words)
            except PromptError as err:
                skipped.append((e.name, i, str(err)))
                continue
            texts[(e.name, i)] = (text, planned.plan.target.text)
            jobs += [Job(e.name, i, seed) for seed in range(seeds)]
    return sorted(jobs), texts, skipped


# ------------------------------------------------------------------------------ running jobs

@dataclass
class Scoring:
    """What every job is scored with; the same in every process."""

    samples: int
    clip: object | None  # scores.Clip, or None when CLIP is not available
    references: dict  # concept name -> (reference images, masks or None), loaded on first use

    def key(self) -> dict:
        return {"mi_samples": self.samples, "clip": self.clip.name if self.clip is not None else None}


def _write(path: Path, write) -> None:
    """Write through a temporary file, so an interrupted run never leaves half a file behind."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def run_job(model, entry: Entry, job: Job, texts: tuple[str, str], out: Path, settings, scoring: Scoring):
    """Generate (unless the job's images are there) and score (unless its scores are there) one job.
    Returns (its CSV rows, generated?, scored?)."""
    from PIL import Image
    from safetensors.torch import load_file, save_file

    from . import generate as engine
    from . import scores
    from .settings import Settings

    folder = out / job.folder
    latents_file = folder / "latents.safetensors"
    images_files = {m: folder / f"{m}.png" for m in METHODS}
    generated = scored = False
    if latents_file.is_file() and all(p.is_file() for p in images_files.values()):
        latents = load_file(str(latents_file))
    else:
        gen = engine.generate_concept(model, texts[0], entry.concept, Settings(
            seed=job.seed, steps=settings.steps, guidance=settings.guidance, size=settings.size, record_maps=False))
        folder.mkdir(parents=True, exist_ok=True)
        for m in METHODS:
            _write(images_files[m], lambda p, m=m: gen.images[m].save(p, format="png"))
        latents = {m: gen.latents[m].contiguous() for m in METHODS}
        _write(latents_file, lambda p: save_file(latents, str(p)))  # last: its presence marks the job done
        generated = True

    scores_file = folder / "scores.json"
    cached = json.loads(scores_file.read_text()) if scores_file.is_file() else None
    if cached is None or cached.get("scoring") != scoring.key():
        mi = scores.mi_scores(model, {m: latents[m] for m in METHODS}, model.family.prompt(texts[1]),
                              samples=scoring.samples)
        result = {m: {"mi": mi[m].value, "mi_stderr": mi[m].stderr} for m in METHODS}
        if scoring.clip is not None:
            images = []
            for m in METHODS:
                with Image.open(images_files[m]) as im:
                    images.append(im.convert("RGB"))
            text = scores.text_alignment(scoring.clip, images, [texts[1]] * len(images))
            if entry.name not in scoring.references and entry.references:
                masks = scores.open_images(entry.masks) if entry.masks else None
                scoring.references[entry.name] = (scores.open_images(entry.references), masks)
            image = [None] * len(METHODS)
            if entry.name in scoring.references:
                refs, masks = scoring.references[entry.name]
                image = scores.image_alignment(scoring.clip, images, refs, masks).tolist()
            for m, tv, iv in zip(METHODS, text.tolist(), image):
                result[m].update(clip_text=tv, clip_image=iv,
                                 overall=scores.overall(tv, iv) if iv is not None else None)
        cached = {"scoring": scoring.key(), **result}
        _write(scores_file, lambda p: p.write_text(json.dumps(cached, indent=1) + "\n"))
        scored = True
    rows = []
    for m in METHODS:
        s = cached[m]
        rows.append({"concept": job.concept, "kind": entry.concept.kind, "prompt_index": job.prompt_index,
                     "seed": job.seed, "method": m, "prompt": texts[0], "p": texts[1], "mi": s["mi"],
                     "mi_stderr": s["mi_stderr"], "clip_text": s.get("clip_text"), "clip_image": s.get("clip_image"),
                     "overall": s.get("overall"), "image": (job.folder / f"{m}.png").as_posix()})
    return rows, generated, scored


# ------------------------------------------------------------------------------ results

def _cell(v) -> str:
    return "" if v is None else repr(float(v)) if isinstance(v, float) else str(v)


def write_csv(rows: list[dict], path: Path) -> None:
    def write(p):
        with open(p, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(COLUMNS)
            w.writerows([[_cell(r[c]) for c in COLUMNS] for r in rows])
    _write(path, write)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summary(rows: list[dict], clip_note: str = "") -> str:
    """The Table-1-shaped summary: per method text alignment, image alignment, overall (CLIP),
    MI, n; then AlignIT's change relative to the customized baseline."""
    by = {m: [r for r in rows if r["method"] == m] for m in METHODS}
    cols = ("clip_text", "clip_image", "overall")
    means = {m: {c: _mean(r[c] for r in by[m]) for c in cols + ("mi",)} for m in METHODS}

    def fmt(v, spec=".3f"):
        return "n/a" if v is None else format(v, spec)

    lines = ["| method | text alignment | image alignment | overall | MI (nats) | n |", "|---|---|---|---|---|---|"]
    for m in METHODS:
        lines.append(f"| {LABELS[m]} | " + " | ".join(fmt(means[m][c]) for c in cols) +
                     f" | {fmt(means[m]['mi'], '.2f')} | {len(by[m])} |")
    change = []
    for c in cols:
        a, b = means["alignit"][c], means["customized"][c]
        change.append("n/a" if a is None or b is None or b == 0 else f"{100 * (a - b) / abs(b):+.1f} %")
    # MI can be near 0 or negative: its change is a difference of means, with the paired standard error
    d = [ra["mi"] - rb["mi"] for ra, rb in zip(by["alignit"], by["customized"])]
    se = (math.sqrt(sum((x - sum(d) / len(d)) ** 2 for x in d) / (len(d) - 1)) / math.sqrt(len(d))
          if len(d) > 1 else float("nan"))
    mi = f"{sum(d) / len(d):+.2f} ± {se:.2f}" if d else "n/a"
    lines.append("| AlignIT vs baseline | " + " | ".join(change) + f" | {mi} | |")
    if clip_note:
        lines.append(f"\n{clip_note}; text alignment is measured by the MI score alone.")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ the command

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, type=Path,
                   help="CustomConcept101 dataset.json (or its folder), or a manifest in that layout")
    p.add_argument("--concepts", type=Path, help="folder holding one concept folder per dataset entry")
    p.add_argument("--model", default="auto", help="auto | embedded | a diffusers folder | a hub id")
    p.add_argument("--only", nargs="+", metavar="CONCEPT", help="evaluate only these concepts")
    p.add_argument("--prompts", type=int, help="the first N prompts of each concept (default: all)")
    p.add_argument("--seeds", type=int, default=4, help="seeds 0..N-1 per prompt (default 4)")
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("--size", type=int)
    p.add_argument("--mi-samples", type=int, default=32, help="(t, noise) samples of the MI score (default 32)")
    p.add_argument("--device", help="cpu, cuda, ... (default: this process's accelerator, else the CPU)")
    p.add_argument("--out", required=True, type=Path)


def _state(device: str | None):
    import torch
    from accelerate import PartialState

    cpu = (device == "cpu" or not torch.cuda.is_available()
           or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"))
    return PartialState(cpu=cpu)


def _prepare(args, state):
    """Everything that can fail on the user's input, before anything is written."""
    from .settings import Settings, resolve
    from .models import load_model

    if args.seeds < 1 or (args.prompts is not None and args.prompts < 1):
        raise AlignITError("--seeds and --prompts must be at least 1")
    if args.mi_samples < 2:
        raise AlignITError("--mi-samples must be at least 2")
    model = load_model(args.model, args.device or str(state.device))
    settings = resolve(model, Settings(steps=args.steps, guidance=args.guidance, size=args.size))
    entries = read_dataset(args.dataset, model, args.concepts, args.only)
    jobs, texts, skipped = plan(model, entries, args.prompts, args.seeds)
    if not jobs:
        raise PromptError(f"no prompt can be aligned: {skipped[0][2]}" if skipped else "no jobs to run")
    record = {"model": model.source, "steps": settings.steps, "guidance": settings.guidance,
              "size": settings.size, "scheduler": settings.scheduler}
    existing = args.out / "sweep.json"
    if existing.is_file():
        before = json.loads(existing.read_text())
        changed = [k for k in record if before.get(k) != record[k]]
        if changed:
            raise AlignITError(f"{args.out} holds a sweep made with other settings ({', '.join(changed)}); "
                               f"use another --out or the same settings")
    return model, settings, entries, jobs, texts, skipped, record


def run_command(args) -> int:
    """`python -m alignit_core eval ...` in this process (one of `accelerate launch`'s, or alone)."""
    from accelerate.utils import gather_object

    from . import scores

    state = _state(args.device)
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if state.is_main_process else (lambda *a: None)
    try:
        model, settings, entries, jobs, texts, skipped, record = _prepare(args, state)
    except AlignITError as e:
        say(f"error: {e}")
        return 2
    say(f"model: {model.name} ({model.chosen_because}); {len(jobs)} job(s) on {state.num_processes} process(es)")
    for name, i, reason in skipped:
        say(f"skipped {name} prompt {i}: {reason}")
    try:
        clip, clip_note = scores.load_clip(device=model.device), ""
    except AlignITError as e:
        clip, clip_note = None, str(e)
        say(clip_note)
    state.wait_for_everyone()  # every process has checked --out before the main one writes to it
    if state.is_main_process:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sweep.json").write_text(json.dumps(record, indent=1) + "\n")
    by_name = {e.name: e for e in entries}
    scoring = Scoring(args.mi_samples, clip, {})
    rows, counts = [], [0, 0]
    with state.split_between_processes(jobs) as mine:
        for n, job in enumerate(mine, 1):
            got, generated, scored = run_job(model, by_name[job.concept], job, texts[(job.concept, job.prompt_index)],
                                             args.out, settings, scoring)
            rows += got
            counts[0] += generated
            counts[1] += scored
            print(f"[{state.process_index}] {n}/{len(mine)} {job.concept} prompt {job.prompt_index} seed {job.seed}: "
                  f"{'generated' if generated else 'images reused'}, {'scored' if scored else 'scores reused'}",
                  file=sys.stderr, flush=True)
    rows = gather_object(rows) if state.num_processes > 1 else rows
    counts = gather_object([counts]) if state.num_processes > 1 else [counts]
    if state.is_main_process:
        order = {m: i for i, m in enumerate(METHODS)}
        rows.sort(key=lambda r: (r["concept"], r["prompt_index"], r["seed"], order[r["method"]]))
        write_csv(rows, args.out / "results.csv")
        table = summary(rows, clip_note)
        _write(args.out / "summary.md", lambda p: p.write_text(table + "\n"))
        generated, scored = (sum(c[i] for c in counts) for i in (0, 1))
        say(f"{len(jobs)} job(s): generated {generated}, scored {scored}; the rest reused from {args.out}")
        print(table)
        print(args.out / "results.csv")
    state.wait_for_everyone()
    return 0
