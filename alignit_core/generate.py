"""Baseline, AlignIT and base rows as ONE batched denoising call.

    gen = generate_concept(model, "a <striped-ball> on a green background", concept, Settings(seed=3))
    gen.images["customized"], gen.images["alignit"], gen.maps["alignit"]  # (tokens, 16, 16)

Each row of the batch has its own text conditioning and its own K/V writes; all rows start from
the seed's one initial latent. The loop is written out here (not `pipe(...)`) because a diffusers
pipeline object and its scheduler keep per-call state, and a demo serves several people at once.
Nothing here depends on the model family: the family (families/) encodes, calls the denoiser and
decodes.
"""
from __future__ import annotations

import numpy as np
import torch

from .concepts import Concept, one_model
from .conditioning import Row, condition
from .errors import ConceptError, ModelError, PromptError
from .prompts import MAX_PROMPT_CHARS, SwapPlan, check_positions, max_tokens
from .record import Generation, Request
from .settings import SCHEDULERS, Settings, resolve



# ------------------------------------------------------------------------------ the batched call

def run_rows(model, rows: list[Row], settings: Settings, progress=None, on_kv=None):
    """Denoise all rows in one batch. Returns (PIL images, {row: (tokens, side, side) maps},
    bytes held by the map store, final latents (rows, C, h, w) on the CPU). A run that fails
    (an exception in a callback, out of memory) hands its GPU memory back before raising, so the
    model serves the next request; running out of GPU memory raises ModelError. A family with its
    own loop (MMDiT: side streams through every block and step) denoises the rows itself."""
    try:
        if model.family.own_loop:
            return model.family.denoise(rows, settings, progress, on_kv)
        return _denoise(model, rows, settings, progress, on_kv)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        raise ModelError("out of GPU memory; try a smaller size or fewer steps") from None
    except BaseException:
        torch.cuda.empty_cache()  # a no-op unless CUDA is in use
        raise


@torch.no_grad()
def _denoise(model, rows: list[Row], settings: Settings, progress=None, on_kv=None):
    r, steps = len(rows), settings.steps
    family = model.family
    cond = condition(model, rows, settings, on_kv)
    state = cond.state
    sched = family.scheduler(SCHEDULERS[settings.scheduler])
    sched.set_timesteps(steps, device=model.device)
    latent = family.initial_latent(settings.seed, settings.size)
    latents = latent.to(model.device, model.dtype).repeat(r, 1, 1, 1) * sched.init_noise_sigma
    for i, t in enumerate(sched.timesteps):
        state.step = i
        x = sched.scale_model_input(torch.cat([latents, latents]), t)
        eps = family.predict(cond.denoiser, x, t, cond.hidden, cond.added, state)
        uncond, cond_eps = eps.chunk(2)
        latents = sched.step(uncond + settings.guidance * (cond_eps - uncond), t, latents).prev_sample
        if progress is not None:
            progress(i + 1, steps)
    images = family.decode(latents)
    maps = {}
    if state.maps is not None:
        all_maps = state.maps.maps().cpu().numpy()  # (r, tokens, side, side)
        for k, row in enumerate(rows):
            maps[row.name] = all_maps[k, : len(row.prompt.ids)].astype(np.float32)
    store_bytes = state.maps.total.nbytes if state.maps is not None else 0
    return images, maps, store_bytes, latents.float().cpu()



# ------------------------------------------------------------------------------ the two modes

def size_warning(model, size: int) -> str:
    """Why a size far from the one the model was trained at will likely look wrong ("" when it is
    near it: within a quarter). The embedded model, trained at 128 px, draws four objects at 256 px
    and noise at 64 px; SD 1.5 repeats subjects well above 512 px."""
    native = model.native_size
    if 0.75 * native <= size <= 1.25 * native:
        return ""
    what = "repeated or tiled objects" if size > native else "noise or broken shapes"
    return (f"{model.name} was trained on {native}×{native} px images; at {size} px expect {what} "
            f"(use about {native} px)")


def check_prompt(text: str) -> str:
    """`text` with its whitespace collapsed; PromptError when it is empty or over MAX_PROMPT_CHARS."""
    if not isinstance(text, str) or not text.strip():
        raise PromptError("the prompt is empty; type what the image should show")
    if len(text) > MAX_PROMPT_CHARS:
        raise PromptError(f"the prompt is {len(text)} characters; the limit is {MAX_PROMPT_CHARS}")
    return " ".join(text.split())


def _size_warnings(model, settings: Settings) -> list[str]:
    warning = size_warning(model, settings.size)
    return [warning] if warning else []


def _long_warnings(model, prompt) -> list[str]:
    """The warning for words a truncated prompt dropped."""
    if prompt.dropped and not prompt.parts:
        return [f"the prompt is longer than the {max_tokens(model.tokenizer)} tokens this model reads; these words "
                f"were dropped: {prompt.dropped!r} (long-prompt mode 'segments' keeps them)"]
    return []


def _finish(model, rows: list[Row], settings: Settings, request: Request, result, warnings) -> Generation:
    images, maps, store_bytes, latents = result
    names = [row.name for row in rows]
    return Generation(dict(zip(names, images)), maps, {row.name: row.prompt.tokens for row in rows},
                      {row.name: row.swapped for row in rows}, settings, request, rows,
                      {"name": model.name, "source": model.source, "accelerations": tuple(model.accelerations)},
                      store_bytes, dict(zip(names, latents)),
                      warnings + _long_warnings(model, request.p) + _size_warnings(model, settings))


# several concepts on a model of the shapes world, whose pictures hold one object each
ONE_OBJECT = ("the embedded model draws one object per picture, so the concepts come out mixed into one object; "
              "AlignIT still swaps in each concept's rows, as on Stable Diffusion, which draws each concept")


def generate_concept(model, text: str, concept: Concept | list[Concept], settings: Settings = Settings(),
                     positions: list[int] | None = None, include_base: bool = False,
                     include_customized: bool = True, progress=None, on_kv=None) -> Generation:
    """Customized baseline | AlignIT (| base model on p), one batch. `positions` overrides the
    swapped positions of p (default: the class word's positions the concept covers).

    Several concepts in one prompt: AlignIT takes each concept's rows of p from its own customized
    model's p' (which holds only that concept); the customized baseline is the one model holding them
    all (concepts.one_model), left out with a warning where none does; `positions`, if given, must be
    among the concepts' own. Prompts of at most 75 tokens."""
    concepts = [concept] if isinstance(concept, Concept) else list(concept)
    if not concepts:
        raise ConceptError("choose a concept")
    check_concepts(model, concepts)
    text = check_prompt(text)
    settings = resolve(model, settings)
    warnings = [w for c in concepts for w in c.warnings]
    if len(concepts) == 1:
        prompts = model.family.concept_plan(text, concepts[0].words, settings.long_prompt)
        customized, whole, plan = prompts.customized, concepts[0], prompts.plan
        pairs = [(model.family.concept_positions(plan, positions) if positions is not None else plan, whole)]
    else:
        several = model.family.several_concepts_plan(text, [c.words for c in concepts])
        customized, pairs = several.customized, _chosen(list(zip(several.plans, concepts)), positions)
        try:
            whole = one_model(concepts)
        except ConceptError as e:
            whole = None
            warnings.append(str(e))
        if model.is_embedded:
            warnings.append(ONE_OBJECT)
    p = pairs[0][0].target
    rows = [Row("customized", customized, concept=whole)] if include_customized and whole is not None else []
    rows.append(Row("alignit", p, swap=pairs[0][0], swap_concept=pairs[0][1], more_swaps=tuple(pairs[1:])))
    if include_base:
        rows.append(Row("base", p))
    result = run_rows(model, rows, settings, progress, on_kv)
    return _finish(model, rows, settings, Request("alignit", text, p, tuple(pairs), customized=customized), result,
                   warnings)


def check_concepts(model, concepts: list[Concept] = ()) -> None:
    """ConceptError when the model's family does not take one of `concepts`' kinds (SD3 and Flux take
    textual inversion and LoRA, so far) or several concepts in one prompt."""
    kinds = model.family.concept_kinds
    if kinds is not None and any(c.kind not in kinds for c in concepts):
        raise ConceptError(model.family.concept_refusal)
    if len(concepts) > 1 and model.family.several_concepts_refusal:
        raise ConceptError(model.family.several_concepts_refusal)


def _chosen(pairs: list[tuple[SwapPlan, Concept]], positions) -> list[tuple[SwapPlan, Concept]]:
    """Each concept's plan narrowed to the chosen positions (None: all of them); a concept left
    with none is not swapped. Raises PromptError for a position that is no concept's."""
    if positions is None:
        return pairs
    chosen = set(check_positions(pairs[0][0].target, positions))
    outside = sorted(chosen - {pos for plan, _ in pairs for pos in plan.positions})
    if outside:
        raise PromptError(f"position(s) {outside} belong to no concept; with several concepts, swap only "
                          f"positions of theirs")
    return [(plan.narrowed(chosen), c) for plan, c in pairs if chosen & set(plan.positions)]


def generate_swap(model, text: str, swaps: list[tuple[str | int, str]] | None = None,
                  settings: Settings = Settings(), plan: SwapPlan | None = None,
                  include_baseline: bool = True, progress=None, on_kv=None) -> Generation:
    """Token swap: baseline | swapped, one batch. `swaps` are (word or position, source word);
    or give a ready `plan` (e.g. `positions_plan(p, p, [3])` for an identity swap). `on_kv` sees the
    keys and values of every attention layer and step (UNet: `(layer, step, key, value)`; SD3 and
    Flux: a `KVRecord` per block and step, before and after the swap)."""
    text = check_prompt(text)
    settings = resolve(model, settings)
    plan = plan or model.family.swap_plan(text, swaps or [], settings.long_prompt)
    rows = ([Row("baseline", plan.target)] if include_baseline else []) + [Row("swapped", plan.target, swap=plan)]
    result = run_rows(model, rows, settings, progress, on_kv)
    request = Request("swap", text, plan.target, ((plan, None),), swaps=tuple(tuple(x) for x in swaps or ()))
    return _finish(model, rows, settings, request, result, [])
