"""How well an image follows its prompt: mutual information from the denoiser itself, and CLIP.

    report = score_generation(model, gen)            # gen from generate_concept / generate_swap
    report.mi["alignit"].value - report.mi["customized"].value, report.mi["alignit"].token_maps

**MI score**: the point-wise mutual information between a final latent z0 and a prompt p,
estimated with the pipeline's own denoiser ε̂ (Kong et al., "Information-Theoretic Diffusion";
MINDE; MITUNE, "Information Theoretic Text-to-Image Alignment"), in nats; on a DDPM model:

    i(z0; p) ≈ mean over (t, ε) of  k_t · (‖ε − ε̂(z_t, ∅, t)‖² − ‖ε − ε̂(z_t, p, t)‖²),
    z_t = √ᾱ_t z0 + √(1−ᾱ_t) ε,   k_t = T·β_t / (2(1−ᾱ_t)),

t stratified-uniform in [51, T−1], ‖·‖² summed over latent elements, v- and x0-predictions
converted to ε first: how much better the denoiser predicts the noise actually added when it is
told p. Averaged over images drawn for p this equals MITUNE's k_t·‖ε̂(z_t, p) − ε̂(z_t, ∅)‖²
(the orthogonality principle), but for one given image only the difference of errors tells an
image that fits p from one that contradicts it: MITUNE's form grows just as much when p pulls the
denoiser away from what the image shows (README, "Scoring alignment", has the numbers). So this
form is the score; `MIScore.orthogonal` keeps MITUNE's for comparison.

On a rectified-flow model (SD3, Flux: RFMI, Wang et al. 2025) the same estimator runs on the model's
velocity v̂ and its own forward process (noising.py): z_σ = (1−σ) z0 + σ ε, v = ε − z0, σ
stratified-uniform in [1/1000, 1], weight (1−σ)/σ (times the range's width):
i(z0; p) ≈ mean over (σ, ε) of (1−σ)/σ · (‖v − v̂(z_σ, ∅)‖² − ‖v − v̂(z_σ, p)‖²), and
`MIScore.orthogonal` is RFMI's own form, mean (1−σ)/σ · ‖v̂(z_σ, p) − v̂(z_σ, ∅)‖². The family
supplies the process (`noising`), the text (`encode`, `empty`, `token_rows`) and the prediction
(`score_output`); this module asks nothing else of it.

Every row scored in one call sees the same (t, ε) (common random numbers), and (t, ε) depend only
on `seed`, so separate calls agree too: a difference between two images is not sampling noise.
**Per-token MI** (Kong et al., "Interpretable Diffusion via Information Decomposition"): ∅ is
replaced by p's encoding with token k's row taken from ∅'s encoding (positions stay fixed), giving
i(z0; token k | rest of p) as a scalar and as a (h, w) map on the latent grid (channels summed).
Every map sums to its scalar, and the total map sums to the score.

**CLIP scores** (the paper's protocol, after CustomConcept101): text alignment = cosine between the
image's and the text's CLIP ViT-B/32 embeddings, image alignment = mean cosine between the image
and the concept's reference images (references optionally masked to the concept, as CatVersion
does), overall = geometric mean of the two. CLIP weights come from the hub; where they cannot be
loaded, `load_clip` says so and callers report the MI score alone.

No gradio here; the denoiser and text encoders are only read.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import AlignITError, ModelError
from .conditioning import empty_prompt, encode_prompt, pad_segmented
from .record import Generation
from .models import hub_reachable
from .prompts import Prompt

MI_SAMPLES = 32
MI_SEED = 0
MAX_BATCH = 16  # images per denoiser pass while scoring (SDXL at 1024 px still fits a GPU)
CLIP_ID = "openai/clip-vit-base-patch32"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's preprocessing
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MASK_FILL = (0, 0, 0)  # what a masked reference shows outside the concept


def draw(noising, shape: tuple[int, ...], samples: int, seed: int = MI_SEED):
    """The (t, ε) pairs: t stratified over the process's times (`noising.times`: DDPM steps in
    [T_MIN, T−1], rectified-flow noise levels σ), ε standard normal of `shape`, both from a CPU
    generator seeded with `seed`. Returns t (samples,) and ε (samples, *shape) float32, on the CPU."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise AlignITError("the MI score needs a whole number of samples, at least 1")
    g = torch.Generator("cpu").manual_seed(seed)
    t = noising.times(samples, g)
    eps = torch.randn((samples, *shape), generator=g)
    return t, eps


# ------------------------------------------------------------------------------ MI

@dataclass(frozen=True)
class MIScore:
    """The MI estimate for one image and one prompt, in nats."""

    value: float
    samples: np.ndarray  # (samples,) the term for each (t, ε); the same (t, ε) for every row of a call
    map: np.ndarray  # (h, w) latent grid, sums to `value`
    orthogonal: float  # MITUNE's form, mean k_t ‖ε̂(z_t, p) − ε̂(z_t, ∅)‖² (RFMI's on velocities): for comparison
    tokens: tuple[str, ...] = ()  # the prompt's tokens (start and end excluded) when per-token was asked
    token_values: np.ndarray | None = None  # (tokens,) I(z0; token | rest of the prompt)
    token_maps: np.ndarray | None = None  # (tokens, h, w), each sums to its token value

    @property
    def stderr(self) -> float:
        n = len(self.samples)
        return float(self.samples.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")


def difference(a: MIScore, b: MIScore) -> tuple[float, float]:
    """(a − b, standard error of the difference) from the paired samples of one call."""
    d = a.samples.astype(np.float64) - b.samples.astype(np.float64)
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    return float(d.mean()), se


def _condition_with_token_removed(cond: torch.Tensor, empty: torch.Tensor, rows: list[int]) -> torch.Tensor:
    out = cond.clone()
    out[rows] = empty[rows]
    return out


@torch.no_grad()
def mi_scores(model, latents: dict[str, torch.Tensor], prompt: Prompt, samples: int = MI_SAMPLES,
              per_token: bool = False, seed: int = MI_SEED, progress=None) -> dict[str, MIScore]:
    """MI between each final latent (C, h, w) and `prompt` (read by the base model's text encoder),
    every latent under the same (t, ε). `per_token` adds each content token's conditional MI and
    map. `progress(done, total)` is called after each denoiser pass. Raises AlignITError on bad input."""
    if not latents:
        raise AlignITError("nothing to score: no latents were given")
    if prompt.vectors:
        raise AlignITError("the MI score reads the prompt with the base model; write the class word, "
                           "not the concept token")
    names = list(latents)
    z0 = torch.stack([latents[n].float() for n in names]).to(model.device)  # (r, C, h, w)
    r = len(names)
    family = model.family
    noising = family.noising()
    t_all, eps_all = draw(noising, tuple(z0.shape[1:]), samples, seed)
    k_all = noising.weight(t_all).float()

    cond, pooled = encode_prompt(model, prompt, None)
    empty, pooled_empty, pad = empty_prompt(model)
    if prompt.parts:  # a long prompt's segment rows; ∅ and p padded alike, as in the generation
        cond, empty = pad_segmented(model, [cond, empty], [pad, pad])
    positions = prompt.content if per_token else []
    # conditions: [∅, p, p with token k's rows from ∅ ...]; each compared with p
    hidden = torch.stack([empty, cond] + [_condition_with_token_removed(cond, empty, family.token_rows(prompt, k))
                                          for k in positions])
    pooleds = [pooled_empty, pooled] + [pooled] * len(positions)  # p's pooled text for every per-token condition
    n_cond = hidden.shape[0]

    value_sum = torch.zeros(samples, r, n_cond - 1)  # per sample, row, condition compared with p
    orthogonal = torch.zeros(samples, r)
    map_sum = torch.zeros(r, n_cond - 1, *z0.shape[2:])
    chunk = max(1, MAX_BATCH // (r * n_cond))
    for start in range(0, samples, chunk):
        t = t_all[start:start + chunk].to(model.device)
        s = len(t)
        eps = eps_all[start:start + chunk].to(model.device)
        k = k_all[start:start + s].to(model.device)
        # (s, r, C, h, w): every row noised with the same ε at the same t
        z_t = noising.noised(z0.unsqueeze(0), eps.unsqueeze(1), t).reshape(s * r, *z0.shape[1:])
        tt = t.repeat_interleave(r).repeat(n_cond)  # batch layout: (condition, sample, row)
        enc = hidden.repeat_interleave(s * r, dim=0)
        x = z_t.repeat(n_cond, 1, 1, 1)
        out = family.score_output(x.to(model.dtype), tt, enc, [q for q in pooleds for _ in range(s * r)]).float()
        # the prediction of ε (DDPM) or of the velocity ε − z0 (rectified flow): (n_cond, s, r, C, h, w)
        pred = noising.predicted(out, x, tt).reshape(n_cond, s, r, *z0.shape[1:])
        truth = noising.target(z0.unsqueeze(0), eps.unsqueeze(1))  # (s, r or 1, C, h, w)
        # squared error per latent pixel (channels summed): (n_cond, s, r, h, w)
        err = (truth.unsqueeze(0) - pred).pow(2).sum(3)
        # how much better it is predicted knowing p than knowing ∅ (or p without token k): (n_cond-1, s, r, h, w)
        gain = k.view(1, s, 1, 1, 1) * (torch.cat([err[:1], err[2:]]) - err[1:2])
        value_sum[start:start + s] = gain.sum((-2, -1)).permute(1, 2, 0).cpu()
        map_sum += gain.sum(1).permute(1, 0, 2, 3).cpu()
        orthogonal[start:start + s] = (k.view(s, 1, 1, 1, 1) * (pred[1] - pred[0]).pow(2)).sum((2, 3, 4)).cpu()
        if progress is not None:
            progress(start + s, samples)
    maps = (map_sum / samples).numpy()
    scores = {}
    texts = tuple(prompt.tokens[k].text for k in positions)
    for i, name in enumerate(names):
        per_sample = value_sum[:, i, 0].numpy().astype(np.float64)
        extra = {}
        if per_token:
            extra = dict(tokens=texts, token_values=value_sum[:, i, 1:].double().mean(0).numpy(),
                         token_maps=maps[i, 1:])
        scores[name] = MIScore(float(per_sample.mean()), per_sample, maps[i, 0],
                               float(orthogonal[:, i].double().mean()), **extra)
    return scores


# ------------------------------------------------------------------------------ CLIP

@dataclass(eq=False)
class Clip:
    """A CLIP model and its tokenizer, embedding images and texts to unit vectors."""

    model: torch.nn.Module  # transformers.CLIPModel
    tokenizer: object
    name: str = CLIP_ID

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _pixels(self, images: list[Image.Image]) -> torch.Tensor:
        """OpenAI CLIP preprocessing: shorter side to the input size (bicubic), centre crop, normalise."""
        n = self.model.config.vision_config.image_size
        out = []
        for im in images:
            im = im.convert("RGB")
            scale = n / min(im.size)
            im = im.resize((max(n, round(im.width * scale)), max(n, round(im.height * scale))),
                           Image.Resampling.BICUBIC)
            left, top = (im.width - n) // 2, (im.height - n) // 2
            a = np.asarray(im.crop((left, top, left + n, top + n)), dtype=np.float32) / 255.0
            out.append((a - CLIP_MEAN) / CLIP_STD)
        return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float().to(self.device)

    @torch.no_grad()
    def image_embeddings(self, images: list[Image.Image]) -> torch.Tensor:
        """(n, dim) unit vectors."""
        m = self.model
        e = m.visual_projection(m.vision_model(pixel_values=self._pixels(images)).pooler_output)
        return torch.nn.functional.normalize(e.float(), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """(n, dim) unit vectors; texts longer than CLIP reads are cut."""
        m = self.model
        batch = self.tokenizer(texts, padding=True, truncation=True,
                               max_length=m.config.text_config.max_position_embeddings, return_tensors="pt")
        batch = batch.to(self.device)
        e = m.text_projection(m.text_model(input_ids=batch["input_ids"],
                                           attention_mask=batch["attention_mask"]).pooler_output)
        return torch.nn.functional.normalize(e.float(), dim=-1)


def load_clip(name: str = CLIP_ID, device: str | torch.device | None = None) -> Clip:
    """CLIP from the hub cache (or the hub when it is reachable). Raises ModelError saying that
    CLIP is not available when the weights cannot be loaded."""
    from transformers import CLIPModel, CLIPTokenizer

    offline = not hub_reachable()
    try:
        model = CLIPModel.from_pretrained(name, local_files_only=offline)
        tokenizer = CLIPTokenizer.from_pretrained(name, local_files_only=offline)
    except Exception as e:  # no cache, no network, a broken download: all mean the same to a user
        why = "not in the local cache, and the hub is not reachable" if offline else f"{type(e).__name__}"
        raise ModelError(f"CLIP is not available ({name}: {why})") from None
    return Clip(model.to(device or "cpu").eval().requires_grad_(False), tokenizer, name)


def masked(image: Image.Image, mask) -> Image.Image:
    """`image` with everything outside `mask` (an (H, W) bool array or an L/1 image, white = concept)
    set to MASK_FILL."""
    m = np.asarray(mask.convert("L").resize(image.size, Image.Resampling.NEAREST)) > 127 \
        if isinstance(mask, Image.Image) else np.asarray(mask, dtype=bool)
    if m.shape != (image.height, image.width):
        raise AlignITError(f"the mask is {m.shape[1]}x{m.shape[0]} but the image is {image.width}x{image.height}")
    a = np.asarray(image.convert("RGB")).copy()
    a[~m] = MASK_FILL
    return Image.fromarray(a)


def text_alignment(clip: Clip, images: list[Image.Image], texts: list[str]) -> np.ndarray:
    """(n,) cosine between each image and its text."""
    return (clip.image_embeddings(images) * clip.text_embeddings(texts)).sum(-1).cpu().numpy().astype(np.float64)


def image_alignment(clip: Clip, images: list[Image.Image], references: list[Image.Image],
                    reference_masks: list | None = None) -> np.ndarray:
    """(n,) mean cosine between each image and every reference image (each reference masked to
    the concept by its mask, when masks are given)."""
    if not references:
        raise AlignITError("image alignment needs at least one reference image")
    if reference_masks is not None:
        if len(reference_masks) != len(references):
            raise AlignITError(f"{len(reference_masks)} masks for {len(references)} reference images")
        references = [masked(im, m) for im, m in zip(references, reference_masks)]
    sims = clip.image_embeddings(images) @ clip.image_embeddings(references).T  # (n, refs)
    return sims.mean(1).cpu().numpy().astype(np.float64)


def overall(text: float, image: float) -> float:
    """Geometric mean of text and image alignment; a negative cosine counts as 0."""
    return math.sqrt(max(text, 0.0) * max(image, 0.0))


# ------------------------------------------------------------------------------ one generation

def intended_text(family, p: str, swaps: list) -> str:
    """What a token swap means to draw: p with every swapped word replaced by its source word
    (`a jumping dog`, dog=zebra -> `a jumping zebra`; `banana in a white plate`, 4=black ->
    `banana in a black plate`), positions read in `family`'s token table. A swap that covers part
    of a word replaces the whole word."""
    prompt = family.prompt(p)
    words = p.split()
    new: dict[int, str | None] = {}
    for target, source in swaps:
        covered = family.swap_plan(p, [(target, source)]).positions
        index = sorted({prompt.tokens[i].word_index for i in covered})
        new[index[0]] = source
        new.update({i: None for i in index[1:]})
    return " ".join(new.get(i, w) for i, w in enumerate(words) if new.get(i, w) is not None)


@dataclass
class AlignmentReport:
    """Scores of every image of one Generation against the text the user means."""

    text: str  # the prompt every image was scored against
    mi: dict[str, MIScore]  # row -> MI score (with per-token values and maps)
    reference: str  # the row the others are compared with: the customized baseline / the baseline
    differences: dict[str, tuple[float, float]]  # row -> (MI(row) − MI(reference), paired std. error)
    clip_text: dict[str, float] = field(default_factory=dict)  # row -> text alignment, when CLIP ran
    clip_image: dict[str, float] = field(default_factory=dict)  # row -> image alignment, with references
    clip_note: str = ""  # why there are no CLIP scores, if there are none
    positions: tuple[int, ...] = ()  # positions of `text` that were swapped, when they line up with p
    token_positions: tuple[int, ...] = ()  # position of each per-token value and map in `text`


def scoring_text(model, gen: Generation) -> str:
    """Concept mode: p (the concept replaced by its class word). Token swap: p with the swapped
    words replaced by their sources."""
    req = gen.request
    if req.mode == "swap" and req.swaps:
        return intended_text(model.family, req.p.text, list(req.swaps))
    return req.p.text


def score_generation(model, gen: Generation, clip: Clip | None = None, references: list[Image.Image] = (),
                     samples: int = MI_SAMPLES, clip_note: str = "", progress=None) -> AlignmentReport:
    """MI (with per-token maps) of every row of `gen`, and CLIP scores when `clip` is given
    (image alignment only with `references`). All rows are scored against `scoring_text`.
    Raises AlignITError when `gen` kept no latents."""
    if not gen.latents:
        raise AlignITError("this generation kept no latents to score; generate again")
    model.family.noising()  # a model the MI score does not fit says so here
    text = scoring_text(model, gen)
    prompt = model.family.prompt(text, gen.settings.long_prompt)
    mi = mi_scores(model, gen.latents, prompt, samples=samples, per_token=True, progress=progress)
    rows = list(gen.latents)
    reference = rows[0]
    diffs = {row: difference(mi[row], mi[reference]) for row in rows[1:]}
    positions = gen.swapped[rows[-1]] if gen.mode == "swap" else gen.swapped["alignit"]
    if len(prompt.ids) != len(gen.tokens[rows[-1]]):
        positions = ()
    report = AlignmentReport(text, mi, reference, diffs, positions=positions, token_positions=tuple(prompt.content),
                             clip_note="" if clip is not None else (clip_note or "CLIP is not available"))
    if clip is not None:
        images = [gen.images[r] for r in rows]
        report.clip_text = dict(zip(rows, text_alignment(clip, images, [text] * len(rows)).tolist()))
        if references:
            report.clip_image = dict(zip(rows, image_alignment(clip, images, list(references)).tolist()))
    return report


def open_images(paths) -> list[Image.Image]:
    """Reference images from files, loaded fully (the files are closed again)."""
    out = []
    for p in paths:
        with Image.open(Path(p)) as im:
            out.append(im.convert("RGB"))
    return out
