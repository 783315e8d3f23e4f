"""Train the embedded shapes-world model and its concepts, and write them under assets/.

    python scripts/train_embedded.py --out assets            # everything, resumable
    python scripts/train_embedded.py --smoke --out /tmp/x     # seconds-long check of every stage

Stages: `vae` (AutoencoderKL, scale factor 8), `unet` (UNet2DConditionModel + CLIPTextModel
trained jointly on captions), `concepts` (textual inversion, Custom Diffusion and a text-encoder
fine-tune for each novel instance), `export` (the diffusers folder and concept folders). Each
stage checkpoints into --work and resumes from there; batches are drawn from per-step seeds, so a
resumed run draws the same data as an uninterrupted one. Uses CUDA when present. `--unet-init`
continues an exported UNet + text encoder, `--decoder-init` fine-tunes only an exported VAE's
decoder (its latent space stays), `--init-from` retrains only the concepts. `--ti-vectors N` gives a
textual-inversion token N vectors (diffusers' --num_vectors), each starting as the class word.
`--cd-detach-start` trains Custom Diffusion with its authors' stop-gradient on the start of text's
keys and values (off for the shipped concepts: scripts/EXPERIMENTS.md says what it does here).

The world's captions name patterns (`a blue striped square`, `a green star with a hole`,
--pattern-mix of the scenes) on every shape and colour except the concepts' instances
(`shapes.NOVEL`): the instances are new combinations of things the model can draw, as a real
concept is for Stable Diffusion. --novel-mix P makes them part of the world instead (a share P of
the scenes shows one, named in words: `a red striped circle`), as Stable Diffusion can draw a
red-and-white striped ball when asked in words.

Large CLIP-conditioned models read a word from its own row, ignore the padding rows (their text
encoder is frozen; Toker et al., "Padding Tone", NAACL 2025) and put each word's cross-attention on
what it drew. A 3-layer encoder trained jointly with a small UNet learns none of that by itself:
its causal attention copies every word into all later rows, and the UNet read the whole prompt
from the end-token rows with nearly even attention over the tokens. What the UNet's training does
about it, each a share of the captions:

* --swap-mix: one attribute word's row comes from a dummy prompt (`* * square * * * *`) naming
  another value, and the target shows that value;
* --pure-mix: every word's row comes from its own one-word prompt (the word, `*` elsewhere), so
  no row carries another word;
* --eot-mix: the rows from the end token on are another caption's, so they tell nothing about the
  picture and the UNet learns to read nothing from them;
* --end-noise: the end and padding rows moved together by one random direction (a text-encoder
  fine-tune moves them that way), the picture unchanged, so that whatever is later written into
  them is not read;
* --prefix-noise: the same for the start token's row and the rows of the words that draw nothing
  (`a`, `photo`, `of`, `on`), where a last-layer fine-tune wrote its instance once the UNet read nothing
  from the end rows (scripts/EXPERIMENTS.md, v22);
* --compound-mix: the object's words (`red striped circle`) are folded into one vector made of their
  embeddings (scaled 1-10x, as textual inversion's vectors grow, and noised), whose row is computed
  in the caption or among `*`s, and the target shows the object: one row names a whole object,
  whatever came before it, as a concept's token must; --compound-class makes a share of them AlignIT's
  own case: the caption holds the bare shape word there (`a circle on a blue background`, the later rows
  computed after it) and the vector's row is computed among `*`s (scripts/EXPERIMENTS.md, v24);
  --fold-bank with --bank-mix gives a share of captions that case with a textual inversion of one of the
  world's own objects for the row (`scripts/concept_bank.py`), the picture that object on the caption's
  background, as a user's concept meets AlignIT (scripts/EXPERIMENTS.md, v24i), --bank-context a share of
  those the customized model's case, the vector in the caption (v24j), and --bank-modifier a share of AlignIT's
  cases in Custom Diffusion's form, the class word's row after the vector; --compound-modifier a share of
  the folded AlignIT cases in that form, the folded vector before the bare shape word (v24v);
* --absorb-mix: Custom Diffusion's AlignIT case with a word for its modifier: the object's colour word
  leaves the caption (`a photo of a star on ...`) and only the shape word's row, computed after it among
  `*`s (`* * * orange star`), tells the colour (v24u);
* --attention-weight: a loss spreads each object word's cross-attention (colour, shape, pattern)
  evenly over the object's silhouette and each background word's over the rest, at the 16x16
  layers (those the heat maps show). Asked of the 8x8 layers too, where this model reads most
  of the prompt, it broke colours and backgrounds for hundreds of steps.
* --filler-weight: a loss on the share of every cross-attention layer's attention that goes to words
  drawing nothing (`a photo of`, `on a`), which this model's object pixels read most at the 16x16 and
  8x8 layers, and through which a Custom Diffusion's key/value change reaches the object
  (`scripts/concept_rows.py --reads`; scripts/EXPERIMENTS.md, v24o).
* --reading-weight: a loss on the share of each pixel's attention, at every cross-attention layer, that
  does not go to the words that drew it (the object's pixels to the object's words, the background's to
  the background's); where the object's pixels read elsewhere (the start of text, `a photo of a`), a Custom
  Diffusion's key/value change reaches the object through rows AlignIT takes from the base model
  (scripts/EXPERIMENTS.md, v24p-v24r). --reading-regions object asks the object's pixels only (v24p);
  balanced counts a region's words as read only as far as the least-read of them (v24s).
* --row-consistency-weight: a loss on how far a row moves with the words before it, for vectors off
  the words' embeddings (scaled and noised words, where textual inversion's vectors lie): the row
  after some words and after as many `*` (AlignIT's p') must agree, so that a concept's row
  computed in p' would be the one it was trained in (scripts/EXPERIMENTS.md: it cost the backgrounds and kept no
  more of the concepts);
* --freeze-text: the encoder stays as initialised and the UNet learns to read it, as SD's UNet
  reads a frozen CLIP.
* --template-mix: captions phrased as the concepts' training prompts are (`a cropped photo of the
  red circle`, textual inversion's template list), so that those words, which draw nothing, are
  words the UNet has read before, as `a photo of` is for Stable Diffusion.

They are part of the base model's training, not of AlignIT: the concepts are trained with their
own methods' objectives only.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from alignit_core.encoding import encode, token_embeddings
from alignit_core.families.sd_unet import cross_attention_sides
from alignit_core.toy.instances import INSTANCES, references
from alignit_core.toy.sampling import MAX_LEN, load_exported, noise_schedule, sample
from alignit_core.toy.shapes import (COLOURS, HELD_OUT, NOVEL, PATTERN_PHRASES, PATTERNS, SHAPES, TEMPLATES, Scene,
                                     classify, pattern_template, random_scene, render, styled, to_uint8,
                                     training_triples)

ROOT = Path(__file__).resolve().parents[1]

TOKENIZER_DIR = ROOT / "assets" / "clip-tokenizer"
MODEL_NAME = "embedded-shapes"
STAR = "*"

def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def progress(stage: str, step: int, total: int, t0: float, loss: torch.Tensor, **parts: torch.Tensor) -> None:
    if step % max(1, total // 20) == 0 or step == total:  # .item() syncs the GPU: only when printing
        rate = step / max(time.time() - t0, 1e-6)
        bar = "#" * int(20 * step / total)
        more = "".join(f" {k} {v.item():.4f}" for k, v in parts.items())
        log(f"{stage} [{bar:<20}] {step}/{total} {rate:.2f} it/s loss {loss.item():.4f}{more}")


def configs(smoke: bool):
    te = CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                        num_attention_heads=4, max_position_embeddings=MAX_LEN, hidden_act="quick_gelu",
                        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    unet = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(32, 64, 64) if smoke else (64, 128, 128),
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=64, attention_head_dim=4, norm_num_groups=32)
    vae = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 64, 64, 64),
               layers_per_block=1, latent_channels=4, sample_size=128, norm_num_groups=32)
    return te, unet, vae


class Vocab:
    """Word -> id for the world's captions (each word is one CLIP token; checked at start)."""

    def __init__(self, tokenizer: CLIPTokenizer):
        text = " ".join(TEMPLATES + tuple(PATTERN_PHRASES.values()))
        words = set(text.replace("{c}", "").replace("{s}", "").replace("{b}", "").split())
        words |= set(COLOURS) | set(SHAPES) | {STAR} | {w for t in CONCEPT_TEMPLATES for w in t.split() if w != "{}"}
        self.ids = {}
        for w in words:
            ids = tokenizer(w).input_ids[1:-1]
            assert len(ids) == 1, f"{w!r} is {len(ids)} tokens"
            self.ids[w] = ids[0]
        self.bos, self.eos, self.pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id

    def ids_of(self, words: list[str]) -> list[int]:
        row = [self.bos] + [self.ids[w] for w in words] + [self.eos]
        return row + [self.pad] * (MAX_LEN - len(row))


def generic_scene(rng: random.Random) -> Scene:
    """Scenes outside the captioned world (stripes, holes) so the VAE can draw any instance."""
    s = random_scene(rng)
    second = rng.choice([c for c in COLOURS if c != s.colour])
    return replace(s, pattern=rng.choice(["striped", "holed"]), second_colour=second)


def ckpt_path(work: Path, stage: str) -> Path:
    return work / f"{stage}.pt"


def save_ckpt(work: Path, stage: str, state: dict) -> None:
    tmp = ckpt_path(work, stage).with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(ckpt_path(work, stage))


def load_ckpt(work: Path, stage: str) -> dict | None:
    p = ckpt_path(work, stage)
    return torch.load(p, map_location="cpu", weights_only=False) if p.exists() else None


# ---------------------------------------------------------------------------------- VAE

def train_vae(args, device, vae_cfg, init: AutoencoderKL | None = None) -> AutoencoderKL:
    """Train the VAE from scratch, or (init) fine-tune only an exported VAE's decoder: its encoder
    and latent space stay, so a UNet trained on that VAE stays valid; half of each batch is then
    patterned, thin stripes being what the decoder drew worst."""
    fine_tune = init is not None
    stage, base, patterned = ("decoder", 7907, 0.35) if fine_tune else ("vae", 7919, 0.0)
    vae = init if fine_tune else AutoencoderKL(**vae_cfg).to(device)
    trainable = list(vae.parameters())
    if fine_tune:
        trainable = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
        vae.requires_grad_(False)
        for p in trainable:
            p.requires_grad_(True)
    opt = torch.optim.AdamW(trainable, lr=args.vae_lr, weight_decay=0.0)
    start = 0
    ck = load_ckpt(args.work, stage)
    if ck:
        vae.load_state_dict(ck["model"]); opt.load_state_dict(ck["opt"]); start = ck["step"]
    t0, total = time.time(), args.vae_steps
    for step in range(start + 1, total + 1):
        rng = random.Random(args.seed * base + step)
        scenes = [generic_scene(rng) if rng.random() < 0.25 else random_scene(rng, patterned=patterned)
                  for _ in range(args.vae_batch)]
        x = render(scenes, device=device)
        g = torch.Generator(device).manual_seed(args.seed * base + step)
        # a frozen encoder runs in fp32, without gradients
        with torch.set_grad_enabled(not fine_tune), \
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and not fine_tune):
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=g, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            rec = vae.decode(z).sample.float()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        if not fine_tune:
            loss = loss + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        progress(stage, step, total, t0, loss)
        over = time.time() - t0 > args.vae_seconds
        if step % args.ckpt_every == 0 or step == total or over:
            save_ckpt(args.work, stage, dict(model=vae.state_dict(), opt=opt.state_dict(), step=step))
            if over:
                log(f"{stage}: stopped at step {step} by its time cap"); break
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def latent_scale(vae, device, seed: int) -> float:
    rng = random.Random(seed)
    x = render([random_scene(rng) for _ in range(64)], device=device)
    return float(1.0 / vae.encode(x).latent_dist.mean.std())


# ---------------------------------------------------------------------------------- UNet + text encoder

OBJECT_WORDS = set(SHAPES) | {"striped", "hole"}


def word_kind(caption: list[str], i: int) -> int:
    """What caption word i draws: 1 the object (its colour, shape and pattern words), 2 the
    background (its colour word and the word `background`), 0 nothing of its own (`a`, `on`, ...)."""
    w = caption[i]
    if w == "background" or (w in COLOURS and i + 1 < len(caption) and caption[i + 1] == "background"):
        return 2
    return 1 if w in OBJECT_WORDS or w in COLOURS else 0


@dataclass
class Compound:
    """One sample's object words (colour, shape, pattern) folded into a single vector at `pos`:
    `weight` x the sum of the words' embeddings (each scaled by `mix`) plus noise of relative norm
    `noise` drawn from `seed`; the vector's row is computed in `ids` (the caption, or the dummy
    prompt `* <vector> * *` when `dummy`)."""

    sample: int
    pos: int
    ids: list[int]
    words: list[int]
    mix: list[float]
    weight: float
    noise: float
    seed: int
    dummy: bool
    vector: torch.Tensor | None = None  # a textual inversion of the bank (`--fold-bank`), in place of the mix
    whole: bool = False  # the customized case: every row from `pos` to the end token computed after the vector
    at: int | None = None  # where the vector stands in `ids`, if not at `pos` (Custom Diffusion's `<vector> <class>`)


@dataclass
class TextBatch:
    """One batch of captions and what their conditioning is made of.

    `ids` are the captions; a swapped sample (`swap_pos` >= 0) takes that row from `dummy`, a
    prompt naming another value with `*` everywhere else, and its target shows that value. A
    purified sample (`pure`) takes every word's row from its own one-word prompt (`pure_ids`, the
    word at its position and `*` elsewhere; rows `pure_pos` of samples `pure_sample`), so no row
    carries another word. From its end token on (`eos`), a sample takes the end-token and padding
    rows of another caption of the batch (`eot_source`; -1: its own). `targets` are the scenes the
    images show."""

    ids: torch.Tensor  # (batch, 77)
    dummy: torch.Tensor  # (batch, 77)
    swap_pos: torch.Tensor  # (batch,), -1: no swap
    eos: torch.Tensor  # (batch,) position of the end token
    eot_source: torch.Tensor  # (batch,) sample whose end-token rows this one takes, -1: its own
    pure_ids: torch.Tensor  # (rows, 77)
    pure_sample: torch.Tensor  # (rows,)
    pure_pos: torch.Tensor  # (rows,)
    word_class: torch.Tensor  # (batch, 77): 1 a word of the object, 2 a word of the background, 0 other
    targets: list[Scene]
    compound: list[Compound] = field(default_factory=list)


def sample_batch(rng: random.Random, vocab: Vocab, batch: int, swap_mix: float, pattern_mix: float = 0.0,
                 pure_mix: float = 0.0, eot_mix: float = 0.0, compound_mix: float = 0.0,
                 novel_mix: float = 0.0, template_mix: float = 0.0, compound_class: float = 0.0,
                 fold_noise: float = 0.3, fold_background: float = 0.0, bank: dict | None = None,
                 bank_mix: float = 0.0, bank_seed: int = 0, bank_context: float = 0.0,
                 bank_modifier: float = 0.0, absorb_mix: float = 0.0, compound_modifier: float = 0.0) -> TextBatch:
    """Captions, the rows to mix into their conditioning, and the scenes the targets show. With
    `novel_mix` the NOVEL instances are part of the world, and that share of scenes shows one of them;
    `template_mix` of the captions are phrased as a concept prompt (`template_phrasing`);
    `compound_class` of the folded objects stand in their caption as AlignIT's p holds a concept
    (`fold_object`), whose vectors move off their words' mix by up to `fold_noise` x their norm, and
    `fold_background` of those also hold another background's words. `bank_mix` of the captions show an
    object of the `bank` (`scripts/concept_bank.py`) on their background, in AlignIT's case, its row from the
    entry's textual inversion (`bank_scene`; drawn from `bank_seed`); `bank_context` of those are the customized
    model's case instead: the vector stands in the caption and every later row is computed after it;
    `bank_modifier` of AlignIT's cases are Custom Diffusion's: the row is the class word's, computed after the
    vector among `*`s (`* * <vector> circle`). `absorb_mix` of the plain captions are Custom Diffusion's AlignIT
    case with a word for its modifier: the object's colour word leaves the caption and only the shape word's row,
    computed after it among `*`s, tells it (`absorb_colour`). `compound_modifier` of the folded objects in AlignIT's
    case are in Custom Diffusion's form: the vector before the bare shape word, the shape word's row computed after it
    among `*`s (`* * <vector> circle`, `fold_object`'s `modifier`)."""
    brng = random.Random(bank_seed)
    excluded = world_excluded(novel_mix)
    ids, dummy, swap_pos, eos, eot, targets = [], [], [], [], [], []  # eot: takes another's end rows
    compounds: list[Compound] = []
    word_class = torch.zeros(batch, MAX_LEN, dtype=torch.long)
    pure_ids, pure_sample, pure_pos = [], [], []
    for b in range(batch):
        shown = (novel_scene(rng) if novel_mix and rng.random() < novel_mix
                 else random_scene(rng, patterned=pattern_mix, excluded=excluded))
        template = rng.choice(TEMPLATES)
        if template_mix and rng.random() < template_mix:
            template = template_phrasing(rng, template)
        banked = bank is not None and bank_mix and brng.random() < bank_mix
        if banked:
            entry = brng.randrange(len(bank["scenes"]))
            shown = bank_scene(brng, bank["scenes"][entry], shown)
        words = pattern_template(template, shown.pattern).split()
        dummy_words, pos = [], -1
        if banked:  # AlignIT's case, whatever else the caption would have been
            pass
        elif rng.random() < 0.1:  # caption dropout for classifier-free guidance
            words = []
        elif rng.random() < swap_mix:
            key, attr = rng.choice([(k, a) for k, a in (("{c}", "colour"), ("{s}", "shape"),
                                                        ("{b}", "background")) if k in words])
            other = shown.background if attr == "colour" else shown.colour
            pool = SHAPES if attr == "shape" else [c for c in COLOURS if c != other]
            new = rng.choice([v for v in pool if v != getattr(shown, attr)])
            target = styled(shown, **{attr: new})
            if ((target.colour, target.shape, target.background) not in HELD_OUT
                    and (target.colour, target.shape, target.pattern) not in excluded):
                pos = words.index(key) + 1
                dummy_words = [STAR] * len(words)
                dummy_words[pos - 1] = new
        caption = " ".join(words).format(c=shown.colour, s=shown.shape, b=shown.background).split()
        absorbed = (absorb_colour(caption, shown) if not banked and words and not dummy_words and absorb_mix
                    and rng.random() < absorb_mix else None)
        if absorbed:
            caption, dummy_words, pos = absorbed
            target = shown
        if banked:
            context = bool(bank_context) and brng.random() < bank_context
            modifier = not context and bool(bank_modifier) and brng.random() < bank_modifier
            caption, compound = fold_object(brng, vocab, words, caption, b, as_class=not context, in_caption=context,
                                            modifier=modifier)
            compound.vector, compound.whole = bank["vectors"][entry], context
            compounds.append(compound)
        elif words and not dummy_words and compound_mix and rng.random() < compound_mix:
            as_class = bool(compound_class) and rng.random() < compound_class
            modifier = as_class and bool(compound_modifier) and rng.random() < compound_modifier
            caption, compound = fold_object(rng, vocab, words, caption, b, as_class, fold_noise, fold_background,
                                            modifier=modifier)
            compounds.append(compound)
        elif words and not absorbed and pure_mix and rng.random() < pure_mix:
            shown_words = [dummy_words[i] if i == pos - 1 else w for i, w in enumerate(caption)]
            for i, w in enumerate(shown_words):
                pure_ids.append(vocab.ids_of([w if j == i else STAR for j in range(len(caption))]))
                pure_sample.append(b)
                pure_pos.append(i + 1)
            if dummy_words:  # the swapped word's row is already its one-word row; the picture shows it
                shown = target
            dummy_words, pos = [], -1
        eot.append(bool(words) and bool(eot_mix) and rng.random() < eot_mix)
        for i, w in enumerate(caption):
            word_class[b, i + 1] = word_kind(caption, i)
        if compounds and compounds[-1].sample == b:
            word_class[b, compounds[-1].pos] = 1
        ids.append(vocab.ids_of(caption))
        dummy.append(vocab.ids_of(dummy_words))
        swap_pos.append(pos)
        eos.append(len(caption) + 1)
        targets.append(target if dummy_words else shown)
    captioned = [b for b in range(batch) if eos[b] > 1]
    source = [rng.choice([c for c in captioned if c != b] or [-1]) if eot[b] else -1 for b in range(batch)]
    pure = torch.tensor(pure_ids, dtype=torch.long).view(-1, MAX_LEN)
    return TextBatch(torch.tensor(ids), torch.tensor(dummy), torch.tensor(swap_pos), torch.tensor(eos),
                     torch.tensor(source), pure, torch.tensor(pure_sample, dtype=torch.long),
                     torch.tensor(pure_pos, dtype=torch.long), word_class, targets, compounds)


def absorb_colour(caption: list[str], shown: Scene):
    """(p, p', the shape word's position) for a caption whose object colour stands just before its shape word
    (`a photo of a red star on a blue background`): p without the colour (`a photo of a star on ...`), p' the
    colour and shape words with `*`s before them, the shape word where it stands in p (`* * * red star`), as
    AlignIT writes a Custom Diffusion concept (`<token> star`, the class word's row only). None where the colour
    is not just before the shape or there is no word before it."""
    i = next((i for i in range(1, len(caption) - 1)
              if caption[i] == shown.colour and caption[i + 1] == shown.shape), None)
    if i is None:
        return None
    return caption[:i] + caption[i + 1:], [STAR] * (i - 1) + [shown.colour, shown.shape], i + 1


def template_phrasing(rng: random.Random, template: str) -> str:
    """The caption template with the words before its object (`a`, `a photo of a`) replaced by a
    concept prompt's (`a cropped photo of the`, `a photo of my`; CONCEPT_TEMPLATES): the world's
    pictures are then also captioned as people caption photos, and these words draw nothing, as
    `a photo of` draws nothing for Stable Diffusion."""
    first = min(template.index(k) for k in ("{c}", "{s}") if k in template)
    return rng.choice(CONCEPT_TEMPLATES).split("{}")[0] + template[first:]


def world_excluded(novel_mix: float) -> frozenset[tuple[str, str, str]]:
    """The (colour, shape, pattern) the base world never draws: the NOVEL ones, none with --novel-mix."""
    return frozenset() if novel_mix else NOVEL


def novel_scene(rng: random.Random) -> Scene:
    """One of the NOVEL instances (`--novel-mix`) on any training background."""
    colour, shape, pattern = rng.choice(sorted(NOVEL))
    triple = rng.choice([t for t in training_triples() if t[:2] == (colour, shape)])
    return styled(random_scene(rng, triple), pattern=pattern)


def fold_object(rng: random.Random, vocab: Vocab, template: list[str], caption: list[str], b: int,
                as_class: bool = False, noise: float = 0.3, background: float = 0.0, in_caption: bool = False,
                modifier: bool = False):
    """The caption with its object's words (colour, pattern, shape: `red striped circle`, `star with
    a hole`) replaced by one vector made of their embeddings, as a customized concept's token names
    a whole object; its row is computed in the caption or, half the time, among `*`s. `as_class`:
    AlignIT's own case, the caption holds the bare shape word where the vector stands (`a circle on a
    blue background`, every later row computed after it) and the vector's row is computed among `*`s.
    `in_caption`: the row always computed in the caption. `background`: that share of AlignIT's case also
    folds in the words of a background the caption does not ask for (`purple background`), as a textual
    inversion learns its references' background with its object; the picture shows the caption's.
    `modifier` (with `as_class`): Custom Diffusion's case, the row is the shape word's after the vector
    (`* <vector> circle * *`), where there is a word before the object to stand the vector on. Drawn from
    the compound's own seed, so that every other draw, caption and picture stays the same."""
    first = template.index("{c}") if "{c}" in template else min(
        i for i, w in enumerate(template) if w in ("striped", "{s}"))
    last = template.index("hole") if "hole" in template else template.index("{s}")
    parts = [w for w in caption[first:last + 1] if w in COLOURS or w in OBJECT_WORDS]
    folded = caption[:first] + [STAR] + caption[last + 1:]
    dummy = as_class or (not in_caption and rng.random() < 0.5)
    ids = vocab.ids_of([STAR] * len(folded) if dummy else folded)
    at = None
    if as_class:
        folded[first] = next(w for w in caption[first:last + 1] if w in SHAPES)
        if modifier and first > 0:
            ids, at = vocab.ids_of([STAR] * first + [folded[first]] + [STAR] * (len(folded) - first - 1)), first
    compound = Compound(sample=b, pos=first + 1, ids=ids, words=[vocab.ids[w] for w in parts],
                        mix=[rng.uniform(0.5, 1.5) for _ in parts], weight=math.exp(rng.uniform(0.0, math.log(10.0))),
                        noise=rng.uniform(0.0, noise), seed=rng.randrange(2 ** 31), dummy=dummy, at=at)
    if as_class and background and "background" in caption:
        own = random.Random(compound.seed + 1)
        if own.random() < background:
            asked = caption[caption.index("background") - 1]
            other = own.choice([c for c in COLOURS if c != asked and vocab.ids[c] not in compound.words])
            compound.words += [vocab.ids[other], vocab.ids["background"]]
            compound.mix += [own.uniform(0.5, 1.5), own.uniform(0.5, 1.5)]
    return folded, compound


def bank_scene(rng: random.Random, entry: Scene, shown: Scene) -> Scene:
    """The bank's object `entry` on `shown`'s background, or on another where that one is the object's own
    colour or makes a held-out triple (the held-out prompts stay unseen)."""
    grounds = [b for b in COLOURS if b != entry.colour and (entry.colour, entry.shape, b) not in HELD_OUT]
    ground = shown.background if shown.background in grounds else rng.choice(grounds)
    return styled(replace(shown, colour=entry.colour, shape=entry.shape, pattern=entry.pattern), background=ground)


def compound_vector(emb: torch.Tensor, c: Compound) -> torch.Tensor:
    """The folded vector of `c` in the embedding table `emb`: its words' mix, moved by a random
    direction of `c.noise` x its own norm; a bank entry's textual inversion as it is."""
    if c.vector is not None:
        return c.vector.to(emb)
    v = c.weight * sum(m * emb[w] for m, w in zip(c.mix, c.words))
    g = torch.Generator().manual_seed(c.seed)
    n = torch.randn(v.shape, generator=g).to(v)
    return v + n / n.norm() * c.noise * v.norm()


def compound_rows(te, compounds: list[Compound], penultimate: bool = False, full: bool = False) -> torch.Tensor:
    """The rows of `compounds`' vectors (n, dim), each computed in its own prompt (`full`: all of that
    prompt's rows, (n, 77, dim))."""
    emb = token_embeddings(te).weight
    vectors = [compound_vector(emb, c) for c in compounds]
    ids = torch.tensor([c.ids for c in compounds], device=emb.device)
    pos = torch.tensor([c.pos for c in compounds], device=emb.device)
    at = torch.tensor([c.pos if c.at is None else c.at for c in compounds], device=emb.device)
    mask = torch.zeros(ids.shape, dtype=torch.bool, device=emb.device)
    mask[torch.arange(len(compounds), device=emb.device), at] = True
    vec = torch.stack(vectors).unsqueeze(1).expand(-1, ids.shape[1], -1)
    hidden = encode(te, ids, vec, mask, penultimate=penultimate).hidden
    return hidden if full else hidden[torch.arange(len(compounds), device=emb.device), pos]


def condition(te, batch: TextBatch, penultimate: bool = False) -> torch.Tensor:
    """The batch's conditioning (batch, 77, dim): captions encoded, with the rows `batch` says
    come from elsewhere (dummy prompts, one-word prompts, another caption's end rows).
    `penultimate`: the second-to-last layer's rows, as SD3 reads its CLIP encoders."""
    device = token_embeddings(te).weight.device
    encoded = encode(te, batch.ids.to(device), penultimate=penultimate).hidden
    hidden = encoded
    swapped = batch.swap_pos.to(device) >= 0
    if swapped.any():
        d = encode(te, batch.dummy.to(device)[swapped], penultimate=penultimate).hidden
        full = torch.zeros_like(hidden)
        full[swapped] = d
        rows = torch.zeros(hidden.shape[:2], dtype=torch.bool, device=device)
        idx = swapped.nonzero().squeeze(1)
        rows[idx, batch.swap_pos.to(device)[idx]] = True
        hidden = torch.where(rows.unsqueeze(-1), full, hidden)
    if len(batch.pure_ids):
        pure = encode(te, batch.pure_ids.to(device), penultimate=penultimate).hidden  # (rows, 77, dim)
        picked = pure[torch.arange(len(pure), device=device), batch.pure_pos.to(device)]
        hidden = hidden.index_put((batch.pure_sample.to(device), batch.pure_pos.to(device)), picked)
    if batch.compound:
        where = (torch.tensor([c.sample for c in batch.compound], device=device),
                 torch.tensor([c.pos for c in batch.compound], device=device))
        full = compound_rows(te, batch.compound, penultimate, full=True).to(hidden.dtype)
        hidden = hidden.index_put(where, full[torch.arange(len(full), device=device), where[1]])
        if any(c.whole for c in batch.compound):  # the customized case: the caption's later rows after the vector
            later = torch.zeros(hidden.shape[:2], dtype=torch.bool, device=device)
            rows = torch.zeros_like(hidden)
            for i, c in enumerate(batch.compound):
                if c.whole:
                    end = int(batch.eos[c.sample])
                    later[c.sample, c.pos:end] = True
                    rows[c.sample, c.pos:end] = full[i, c.pos:end]
            hidden = torch.where(later.unsqueeze(-1), rows, hidden)
    source = batch.eot_source.to(device)
    if (source >= 0).any():
        eos = batch.eos.to(device)
        donor = source.clamp(min=0)
        offset = torch.arange(MAX_LEN, device=device).view(1, -1) - eos.view(-1, 1)  # (batch, 77)
        src_pos = (eos[donor].view(-1, 1) + offset).clamp(0, MAX_LEN - 1)
        donated = encoded[donor.view(-1, 1), src_pos]  # (batch, 77, dim): the donor's end rows, aligned
        replace = (offset >= 0) & (source >= 0).view(-1, 1)
        hidden = torch.where(replace.unsqueeze(-1), donated, hidden)
    return hidden


def silhouettes(scenes: list[Scene], sides, device) -> dict[int, torch.Tensor]:
    """Each scene's object silhouette (holes filled) as the share of every cell it covers on a
    side x side grid, per side: {side: (n, side * side)}."""
    plain = [replace(sc, colour="white", background="black", pattern="plain") for sc in scenes]
    alpha = (render(plain, size=4 * max(sides), device=device)[:, :1] + 1) / 2  # (n, 1, 64, 64)
    return {side: F.interpolate(alpha, size=(side, side), mode="area").flatten(1) for side in sides}


class LatentPool:
    """VAE latents of a fixed set of scenes, `per_key` geometries for every (colour, shape,
    background, pattern) the UNet's batches can ask for, and their silhouettes. On a CPU, encoding
    each batch's pictures costs as much as the training step itself; the pool encodes them once
    (and is kept in --work; the scenes are drawn again from the seed)."""

    def __init__(self, vae, device, per_key: int, seed: int, work: Path, sides=(16,),
                 excluded: frozenset[tuple[str, str, str]] = NOVEL):
        rng = random.Random(seed * 7901)
        self.keys, scenes = {}, []
        for colour, shape, background in training_triples():
            for pattern in ("plain",) + PATTERNS:
                if (colour, shape, pattern) in excluded:
                    continue
                self.keys[(colour, shape, background, pattern)] = range(len(scenes), len(scenes) + per_key)
                scenes += [styled(random_scene(rng, (colour, shape, background)), pattern=pattern)
                           for _ in range(per_key)]
        path = work / f"pool-{per_key}{'' if excluded == NOVEL else '-novel'}.pt"
        if path.exists():
            saved = torch.load(path, map_location="cpu", weights_only=False)
            mean, std = saved["mean"], saved["std"]
        else:
            means, stds, t0 = [], [], time.time()
            with torch.no_grad():
                for i in range(0, len(scenes), 64):
                    post = vae.encode(render(scenes[i:i + 64], device=device)).latent_dist
                    means.append(post.mean.cpu()); stds.append(post.std.cpu())
                    if i % 6400 == 0:
                        log(f"latent pool {i}/{len(scenes)} ({time.time() - t0:.0f} s)")
            mean, std = torch.cat(means), torch.cat(stds)
            torch.save(dict(mean=mean, std=std), path)
        self.mean, self.std = mean.to(device), std.to(device)
        chunks = [silhouettes(scenes[i:i + 1024], sides, device) for i in range(0, len(scenes), 1024)]
        self.masks = {side: torch.cat([c[side] for c in chunks]) for side in sides}

    def draw(self, scenes: list[Scene], rng: random.Random, g: torch.Generator):
        """Unscaled latents (n, 4, h, w) of pictures showing what `scenes` show (any geometry), and
        their silhouettes {side: (n, side * side)}."""
        idx = torch.tensor([rng.choice(self.keys[(s.colour, s.shape, s.background, s.pattern)]) for s in scenes],
                           device=self.mean.device)
        mean, std = self.mean[idx], self.std[idx]
        return mean + std * torch.randn(mean.shape, generator=g, device=mean.device), \
            {side: m[idx] for side, m in self.masks.items()}


def scene_latents(vae, pool: LatentPool | None, scenes: list[Scene], rng: random.Random, g: torch.Generator,
                  device, sides=(16,)):
    """Unscaled latents of pictures of `scenes` and their silhouettes {side: (n, side * side)}:
    from the pool when there is one, else encoded now."""
    if pool is not None:
        return pool.draw(scenes, rng, g)
    with torch.no_grad():
        post = vae.encode(render(scenes, device=device)).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g, device=device)
    return z, silhouettes(scenes, sides, device)


class AttentionProbe:
    """Cross-attention computed as diffusers' plain processor does, keeping each call's head-mean
    probabilities (batch, pixels, tokens) in `maps` for the localisation loss."""

    def __init__(self):
        self.maps: list[torch.Tensor] = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        b, n, _ = hidden_states.shape
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        v = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(q, k, None)  # (batch * heads, pixels, tokens)
        self.maps.append(probs.view(b, attn.heads, n, -1).mean(1))
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        return attn.to_out[1](attn.to_out[0](out))


def probe_cross_attention(unet, sides=(16,)) -> AttentionProbe:
    """Install one AttentionProbe on every cross-attention layer working at `sides` (latent 16x16)."""
    probe = AttentionProbe()
    for _, side, module in cross_attention_sides(unet):
        if side in sides:
            module.set_processor(probe)
    return probe


def localisation_loss(maps: list[torch.Tensor], word_class: torch.Tensor, masks: dict[int, torch.Tensor]) -> torch.Tensor:
    """How far each object or background word's attention, as a distribution over pixels, is from
    being spread evenly over what the word draws (its object's silhouette, or the rest of the
    picture): KL(even over the region || the word's attention), averaged over the probed layers
    and the words; 0 when every pixel of the region, and no other, gets the same share. It asks
    where a word's attention goes, not how much of each pixel's attention it gets."""
    losses = []
    words = word_class > 0  # (batch, 77)
    for probs in maps:  # (batch, pixels, tokens)
        side = math.isqrt(probs.shape[1])
        cls = word_class[:, : probs.shape[2]]
        obj = masks[side].unsqueeze(-1)  # (batch, pixels, 1)
        region = torch.where((cls == 1).unsqueeze(1), obj, 1 - obj)  # (batch, pixels, tokens)
        even = region / region.sum(1, keepdim=True).clamp_min(1e-8)
        spread = probs / probs.sum(1, keepdim=True)
        kl = (even * (torch.log(even.clamp_min(1e-8)) - torch.log(spread.clamp_min(1e-8)))).sum(1)  # (batch, tokens)
        losses.append(kl[words[:, : probs.shape[2]]].mean())
    return torch.stack(losses).mean()


def end_share(maps: list[torch.Tensor], eos: torch.Tensor) -> torch.Tensor:
    """The share of cross-attention that goes to the end-of-text and padding rows, averaged over
    pixels, samples and the probed layers. Stable Diffusion's UNet gives most of it to the start
    token, whose row is the same for every prompt (a sink that carries nothing), and little to the
    padding; a jointly trained model makes the end rows its sink, and whatever later writes into
    them (a text-encoder fine-tune) is read everywhere."""
    return rows_share(maps, lambda pos: pos >= eos.view(-1, 1))


def filler_share(maps: list[torch.Tensor], word_class: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """The share of cross-attention that goes to the rows of words that draw nothing (`a photo of`,
    `on a`: word class 0 between the start token and the end of text), averaged over pixels, samples
    and the probed layers. Stable Diffusion's pixels read little from such words (their maps are
    faint); a model whose object pixels read them gets a Custom Diffusion's key/value change through
    them, rows AlignIT takes from the base model (scripts/EXPERIMENTS.md, v24o)."""
    return rows_share(maps, lambda pos: (pos >= 1) & (pos < eos.view(-1, 1)) & (word_class[:, : pos.shape[1]] == 0))


def reading_shortfall(maps: list[torch.Tensor], word_class: torch.Tensor, masks16: torch.Tensor,
                      regions: str = "both") -> torch.Tensor:
    """How little of each pixel's cross-attention goes to the words that drew it: the object's pixels
    to the object's words (word class 1: colour, shape, pattern, a folded vector), the background's to
    the background's (class 2). 1 - that share, averaged over the pixels (the silhouette at each
    layer's side, pooled from the 16x16 one; a sample's background pixels count where its caption
    names a background), samples and the probed layers. Where the object's pixels read the words
    drawing nothing or the start of text, a Custom Diffusion's key/value change reaches the object
    through rows AlignIT takes from the base model (scripts/EXPERIMENTS.md, v24o); asked of the
    object's pixels alone (`regions` "object"), the background's pixels follow them to the object's
    words (v24p). `regions` "balanced" asks both regions, and counts a region's words as read only as
    far as the least-read of them is: n x its share, for n words (so that the object's pixels read the
    colour word as well as the class word; v24q's, reading the class word, lost the colour swaps)."""
    shares = []
    named_bg = (word_class == 2).any(1, keepdim=True).float() * (regions != "object")  # (batch, 1)

    def group(probs, cls, kind):
        if regions != "balanced":
            return (probs * (cls == kind)).sum(-1)
        mine = cls == kind  # (batch, 1, tokens)
        least = probs.masked_fill(~mine, float("inf")).amin(-1)  # (batch, pixels)
        n = mine.sum(-1).to(probs.dtype)
        return torch.where(n > 0, n * least, torch.zeros_like(least))

    for probs in maps:  # (batch, pixels, tokens)
        side = math.isqrt(probs.shape[1])
        obj = F.avg_pool2d(masks16.view(-1, 1, 16, 16), 16 // side).flatten(1)  # (batch, pixels)
        cls = word_class[:, : probs.shape[2]].unsqueeze(1)
        read = obj * group(probs, cls, 1) + (1 - obj) * named_bg * group(probs, cls, 2)
        weight = obj + (1 - obj) * named_bg
        shares.append(read.sum() / weight.sum().clamp_min(1e-8))
    return 1 - torch.stack(shares).mean()


def rows_share(maps: list[torch.Tensor], chosen) -> torch.Tensor:
    """The share of cross-attention that goes to the rows `chosen(positions)` picks ((1, tokens) ->
    (batch, tokens) bool), averaged over pixels, samples and the probed layers."""
    shares = []
    for probs in maps:  # (batch, pixels, tokens)
        pos = torch.arange(probs.shape[2], device=probs.device).view(1, -1)
        shares.append((probs * chosen(pos).unsqueeze(1)).sum(-1).mean())
    return torch.stack(shares).mean()


def sink_shortfall(maps: list[torch.Tensor], target: float) -> torch.Tensor:
    """How far the start token's share of cross-attention falls short of `target`, per probed layer
    (mean over pixels and samples), averaged: the loss that makes the start token the sink, as it is
    in Stable Diffusion, rather than the words (which then outvote a swapped row)."""
    return torch.stack([F.relu(target - probs[..., 0].mean()) for probs in maps]).mean()


def row_drift(te, batch: TextBatch, vocab: Vocab, g: torch.Generator, prefixes: str = "phrasings",
              n: int = 32) -> torch.Tensor:
    """How far a token's row moves with the words before it, for vectors off the words' embeddings
    (where textual inversion's vectors lie): 1 - cosine between a random vector's row after some
    words and its row after as many `*` (AlignIT's dummy prompt), same position. `prefixes`:
    "phrasings", the words before the token in textual inversion's phrasings (`a photo of a`, `the`,
    ...: words that name nothing drawn); "captions", a caption's first words (colours and shapes too).
    Measured (scripts/EXPERIMENTS.md, models v8 and v9): both cost the backgrounds, and neither kept the concepts."""
    device = token_embeddings(te).weight.device
    emb = token_embeddings(te).weight  # g is the training loop's generator, on its device (CUDA when present)
    captions = [b for b in range(len(batch.eos)) if batch.eos[b] > 1][:n]
    words = [*COLOURS, *SHAPES]
    ids, stars, pos, replaced = [], [], [], []
    for b in captions:
        if prefixes == "captions":
            k = int(torch.randint(1, int(batch.eos[b]), (1,), generator=g, device=g.device))  # a word's position
            before = batch.ids[b, :k].tolist()
            replaced.append(int(batch.ids[b, k]))
        else:
            phrasing = CONCEPT_TEMPLATES[int(torch.randint(len(CONCEPT_TEMPLATES), (1,), generator=g, device=g.device))]
            before = [vocab.bos] + [vocab.ids[w] for w in phrasing.split("{}")[0].split()]
            k = len(before)
            word = words[int(torch.randint(len(words), (1,), generator=g, device=g.device))]
            replaced.append(vocab.ids[word])
        ids.append(before + [vocab.eos] + [vocab.pad] * (MAX_LEN - k - 1))
        stars.append([vocab.bos] + [vocab.ids[STAR]] * (k - 1) + [vocab.eos] + [vocab.pad] * (MAX_LEN - k - 1))
        pos.append(k)
    m = len(ids)
    base = emb[torch.tensor(replaced, device=device)].detach()  # (m, dim): a word's embedding, scaled and noised
    scale = torch.empty(m, 1, device=g.device).uniform_(0.5, 8.0, generator=g).to(device)
    noise = torch.randn(m, emb.shape[1], generator=g, device=g.device).to(device) * torch.empty(m, 1, device=g.device).uniform_(0, 2, generator=g).to(device)
    vectors = (base * scale + noise / emb.shape[1] ** 0.5).unsqueeze(1).expand(m, MAX_LEN, -1)
    mask = torch.zeros(m, MAX_LEN, dtype=torch.bool, device=device)
    mask[torch.arange(m), torch.tensor(pos)] = True
    both = encode(te, torch.tensor(ids + stars, device=device), vectors.repeat(2, 1, 1), mask.repeat(2, 1)).hidden
    rows = both[mask.repeat(2, 1)].view(2, m, -1)
    return (1 - F.cosine_similarity(rows[0], rows[1], dim=-1)).mean()


def noisy_rows(cond: torch.Tensor, eos: torch.Tensor, share: float, scale: float, g: torch.Generator) -> torch.Tensor:
    """`--row-noise`: in a `share` of the captions, each word row (between the start and the end token)
    moved by a random direction of norm up to `scale` × the row's own, drawn uniformly per row, so
    that rows near a word's draw what the word draws (the picture is unchanged)."""
    b, n, _ = cond.shape
    picked = torch.rand(b, generator=g, device=cond.device) < share
    pos = torch.arange(n, device=cond.device).view(1, n)
    words = (pos >= 1) & (pos < eos.view(b, 1)) & picked.view(b, 1)
    direction = torch.randn(cond.shape, generator=g, device=cond.device, dtype=cond.dtype)
    direction = direction / direction.norm(dim=-1, keepdim=True)
    size = torch.rand(b, n, 1, generator=g, device=cond.device, dtype=cond.dtype) * scale * cond.norm(dim=-1, keepdim=True)
    return cond + direction * size * words.unsqueeze(-1)


def noisy_end_rows(cond: torch.Tensor, eos: torch.Tensor, share: float, scale: float,
                   g: torch.Generator) -> torch.Tensor:
    """`--end-noise`: in a `share` of the captions, every row from the end token on moved by one
    random direction of norm up to `scale` x the rows' mean norm, the same for all of them, as a
    text-encoder fine-tune moves them (measured on v4's: 0.7-0.9 x their norm, cosine 0.9 between the
    rows' shifts); the picture is unchanged, so the UNet learns to read nothing from them."""
    end = torch.arange(cond.shape[1], device=cond.device).view(1, -1) >= eos.view(-1, 1)
    return shifted_together(cond, eos, end, share, scale, g)


def shifted_together(cond: torch.Tensor, eos: torch.Tensor, rows: torch.Tensor, share: float, scale: float,
                     g: torch.Generator) -> torch.Tensor:
    """`rows` (batch, tokens) of a `share` of the captions (never a dropped caption) moved by one random
    direction per caption, of norm up to `scale` x the caption's mean row norm, all by the same vector."""
    b = cond.shape[0]
    picked = (torch.rand(b, generator=g, device=cond.device) < share) & (eos > 1)  # captions only
    direction = torch.randn(b, 1, cond.shape[2], generator=g, device=cond.device, dtype=cond.dtype)
    direction = direction / direction.norm(dim=-1, keepdim=True)
    size = torch.rand(b, 1, 1, generator=g, device=cond.device, dtype=cond.dtype) * scale
    size = size * cond.norm(dim=-1).mean(1).view(b, 1, 1)
    return cond + direction * size * (rows & picked.view(b, 1)).unsqueeze(-1)


def noisy_prefix_rows(cond: torch.Tensor, eos: torch.Tensor, word_class: torch.Tensor, share: float, scale: float,
                      g: torch.Generator) -> torch.Tensor:
    """`--prefix-noise`: in a `share` of the captions, the start token's row and the rows of the words
    that draw nothing (`a`, `photo`, `of`, `on`: word class 0) moved by one random direction of norm up
    to `scale` x their mean norm, as a text-encoder fine-tune moves the rows before its token; the
    picture is unchanged, so the UNet learns to read nothing from them and a fine-tune has its own
    token's row left to write into."""
    pos = torch.arange(cond.shape[1], device=cond.device).view(1, -1)
    return shifted_together(cond, eos, (pos < eos.view(-1, 1)) & (word_class == 0), share, scale, g)


def star_drift(te, vocab: Vocab, star: torch.Tensor, rng: random.Random, n: int = 64) -> torch.Tensor:
    """Per sample, how far a token's row after the start of one of textual inversion's phrasings (`a
    photo of a`, `the`, ...) lies from its row after as many `*` with `star` as their embedding: the
    distance over the first row's norm. The token is a world word's embedding, in three samples of four
    scaled 0.5-8x and noised as textual inversion's vectors are."""
    emb = token_embeddings(te).weight.detach()
    words = [vocab.ids[w] for w in (*COLOURS, *SHAPES)]
    star_id = vocab.ids[STAR]
    ids, stars, pos, vectors = [], [], [], []
    for _ in range(n):
        before = [vocab.bos] + [vocab.ids[w] for w in rng.choice(CONCEPT_TEMPLATES).split("{}")[0].split()]
        k, tail = len(before), [vocab.eos] + [vocab.pad] * (MAX_LEN - len(before) - 1)
        ids.append(before + tail); stars.append([vocab.bos] + [star_id] * (k - 1) + tail); pos.append(k)
        word = emb[rng.choice(words)]
        noise = torch.randn(word.shape, generator=torch.Generator().manual_seed(rng.randrange(2 ** 31)))
        vectors.append(word if rng.random() < 0.25
                       else word * rng.uniform(0.5, 8.0) + noise.to(word) * rng.uniform(0.0, 2.0) / word.numel() ** 0.5)
    device = emb.device
    ids, stars = torch.tensor(ids, device=device), torch.tensor(stars, device=device)
    at = torch.zeros(n, MAX_LEN, dtype=torch.bool, device=device)
    at[torch.arange(n), torch.tensor(pos)] = True
    filled = torch.stack(vectors).unsqueeze(1).expand(n, MAX_LEN, -1)
    on_star = stars == star_id
    filled_stars = torch.where(on_star.unsqueeze(-1), star.view(1, 1, -1).expand_as(filled), filled)
    a = encode(te, ids, filled, at).hidden[at]
    b = encode(te, stars, filled_stars, at | on_star).hidden[at]
    return (a - b).norm(dim=-1) / a.norm(dim=-1)


def neutral_star(te, vocab: Vocab, steps: int, seed: int) -> float:
    """`--neutral-star`: tune the `*` token's embedding alone (encoder and UNet kept) so that a token's
    row after `* * * *` is its row after textual inversion's phrasings, as if AlignIT's dummy prompt said
    nothing; a prompt without `*` encodes bit-identically. Returns the mean drift (`star_drift`) on
    held-out samples. Measured (scripts/EXPERIMENTS.md, "And a dummy prompt that says nothing?"): on v4 the drift fell 0.39 ->
    0.21 and the holed star's row came closer (cosine 0.86 -> 0.97), yet AlignIT's row kept it less often (the
    striped ball more); on v15 (row noise) AlignIT's row kept both textual inversions in 72 % of their seeds (92 %
    with textual inversions trained on the template list); on v4 with the holed star's textual inversion on the
    template list, textual inversions 89 % and the last-layer text-encoder fine-tunes 58 % (v4's `*`: 57 %, 82 %)."""
    emb = token_embeddings(te).weight
    star = torch.nn.Parameter(emb[vocab.ids[STAR]].detach().clone())
    opt = torch.optim.Adam([star], lr=3e-3)
    rng, t0 = random.Random(seed), time.time()
    for step in range(1, steps + 1):
        loss = star_drift(te, vocab, star, rng).pow(2).mean()
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        progress("star", step, steps, t0, loss)
    with torch.no_grad():
        emb[vocab.ids[STAR]] = star.detach()
        return star_drift(te, vocab, star, random.Random(seed + 1), 256).mean().item()


def ema_step(opt, params, ema, loss, step: int, rate: float) -> None:
    """One optimiser step on `loss` (gradients clipped to norm 1), then the EMA copies `ema` of
    `params` follow at `rate` (warmed up over the first steps)."""
    opt.zero_grad(set_to_none=True); loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    decay = min(rate, (1 + step) / (10 + step))
    with torch.no_grad():
        torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)


def unet_lr(args, step: int, total: int) -> float:
    """Linear warm-up over 300 steps, then constant or (--cosine) down to a tenth at `total`."""
    lr = args.unet_lr * min(1.0, step / 300)
    if args.cosine:
        lr *= 0.1 + 0.45 * (1 + math.cos(math.pi * min(step / max(total, 1), 1.0)))
    return lr


def train_unet(args, device, vae, scale, te_cfg, unet_cfg, vocab, init=None, pool=None):
    """Train the UNet and text encoder jointly, from scratch or (init) from an exported pair."""
    torch.manual_seed(args.seed)
    if init is None:
        te = CLIPTextModel(te_cfg).to(device)
        unet = UNet2DConditionModel(**unet_cfg).to(device)
    else:
        unet, te = (m.to(device).train().requires_grad_(True) for m in init)
    if args.freeze_text:  # as Stable Diffusion's CLIP: the UNet learns to read the rows it is given
        te.eval().requires_grad_(False)
    params = list(unet.parameters()) + ([] if args.freeze_text else list(te.parameters()))
    opt = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=0.01)
    ema = [p.detach().clone() for p in params]
    sched = DDPMScheduler(**{k: v for k, v in noise_schedule().items() if k != "set_alpha_to_one"})
    alphas = sched.alphas_cumprod.to(device)
    start = 0
    ck = load_ckpt(args.work, "unet")
    if ck:
        unet.load_state_dict(ck["unet"]); te.load_state_dict(ck["te"]); opt.load_state_dict(ck["opt"])
        ema = [e.to(device) for e in ck["ema"]]; start = ck["step"]
    total = ck.get("total", args.unet_steps) if ck else args.unet_steps
    every_layer = args.eot_attention_weight or args.sink_weight or args.filler_weight or args.reading_weight
    probe = (probe_cross_attention(unet, sides=(4, 8, 16) if every_layer else (16,))
             if args.attention_weight or every_layer else AttentionProbe())
    bank = torch.load(args.fold_bank, map_location="cpu", weights_only=False) if args.fold_bank else None
    t0, step = time.time(), start
    while step < min(total, args.unet_stop or total):
        step += 1
        if args.unet_fit_seconds and step == start + 5:
            t_fit = time.time()
        if args.unet_fit_seconds and step == start + 25:  # steps that fit the time given, fixed from here on
            rate = 20 / max(time.time() - t_fit, 1e-6)
            total = max(step, min(args.unet_steps, step + int(rate * (args.unet_fit_seconds - (time.time() - t0)))))
            log(f"unet: {rate:.1f} it/s, training to step {total} to fit {args.unet_fit_seconds:.0f} s")
        rng = random.Random(args.seed * 104729 + step)
        batch = sample_batch(rng, vocab, args.unet_batch, args.swap_mix, args.pattern_mix, args.pure_mix, args.eot_mix,
                             args.compound_mix, args.novel_mix, args.template_mix, args.compound_class,
                             args.fold_noise, args.fold_background, bank, args.bank_mix, args.seed * 6007 + step,
                             args.bank_context, args.bank_modifier, args.absorb_mix, args.compound_modifier)
        g = torch.Generator(device).manual_seed(args.seed * 104729 + step)
        z0, masks = scene_latents(vae, pool, batch.targets, rng, g, device)
        z0 = z0 * scale
        t = torch.randint(0, 1000, (z0.shape[0],), generator=g, device=device)
        eps = torch.randn(z0.shape, generator=g, device=device)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        lr = unet_lr(args, step, total)
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            cond = condition(te, batch)
            if args.row_noise:
                cond = noisy_rows(cond, batch.eos.to(device), args.row_noise_mix, args.row_noise, g)
            if args.end_noise:
                cond = noisy_end_rows(cond, batch.eos.to(device), args.end_noise_mix, args.end_noise, g)
            if args.prefix_noise:
                cond = noisy_prefix_rows(cond, batch.eos.to(device), batch.word_class.to(device),
                                         args.prefix_noise_mix, args.prefix_noise, g)
            probe.maps.clear()
            pred = unet(zt, t, encoder_hidden_states=cond).sample.float()
        loss = F.mse_loss(pred, eps)
        parts = {}
        if args.attention_weight and batch.word_class.any():
            maps16 = [m for m in probe.maps if m.shape[1] == 16 * 16]
            parts["localisation"] = localisation_loss(maps16, batch.word_class.to(device), masks)
            loss = loss + args.attention_weight * parts["localisation"]
        if args.eot_attention_weight:
            parts["end_share"] = end_share(probe.maps, batch.eos.to(device))
            loss = loss + args.eot_attention_weight * parts["end_share"]
        if args.filler_weight:
            parts["filler_share"] = filler_share(probe.maps, batch.word_class.to(device), batch.eos.to(device))
            loss = loss + args.filler_weight * parts["filler_share"]
        if args.reading_weight and batch.word_class.any():
            parts["reading_shortfall"] = reading_shortfall(probe.maps, batch.word_class.to(device), masks[16],
                                                           args.reading_regions)
            loss = loss + args.reading_weight * parts["reading_shortfall"]
        if args.sink_weight:
            parts["sink_shortfall"] = sink_shortfall(probe.maps, args.sink_target)
            loss = loss + args.sink_weight * parts["sink_shortfall"]
        if args.row_consistency_weight:
            parts["row_drift"] = row_drift(te, batch, vocab, g, args.row_prefixes)
            loss = loss + args.row_consistency_weight * parts["row_drift"]
        ema_step(opt, params, ema, loss, step, args.ema)
        progress("unet", step, total, t0, loss, **parts)
        over = time.time() - t0 > args.unet_seconds
        if step % args.ckpt_every == 0 or step == total or over or step == args.unet_stop:
            save_ckpt(args.work, "unet", dict(unet=unet.state_dict(), te=te.state_dict(), opt=opt.state_dict(),
                                              ema=[e.cpu() for e in ema], step=step, total=total))
            if over:
                log(f"unet: stopped at step {step} by its time cap"); break
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    unet.set_attn_processor(AttnProcessor2_0())  # the probe was for training only
    return unet.eval().requires_grad_(False), te.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------- concepts

def diffusion_loss(unet, z0, alphas, cond, g, device):
    t = torch.randint(0, 1000, (z0.shape[0],), generator=g, device=device)
    eps = torch.randn(z0.shape, generator=g, device=device)
    a = alphas[t].view(-1, 1, 1, 1)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        pred = unet(a.sqrt() * z0 + (1 - a).sqrt() * eps, t, encoder_hidden_states=cond).sample.float()
    return F.mse_loss(pred, eps)


def concept_ids(vocab: Vocab, words: list[str], token: str, n: int = 1):
    """ids with the concept token's first position (its `n` ids are placeholders, its vectors learned)."""
    pos = words.index(token) + 1
    ids = vocab.ids_of([x for w in words for x in ([STAR] * n if w == token else [w])])
    return ids, pos


def vector_rows(vec: torch.Tensor, poss, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(vectors (b, length, dim), mask (b, length)): the concept's vectors `vec` (n, dim) written at
    positions pos..pos+n-1 of each row (`concept_ids`' first positions)."""
    b, n = len(poss), vec.shape[0]
    mask = torch.zeros(b, length, dtype=torch.bool, device=vec.device)
    mask[torch.arange(b).view(-1, 1), torch.tensor(poss).view(-1, 1) + torch.arange(n)] = True
    vectors = vec.new_zeros(b, length, vec.shape[1])
    vectors[mask] = vec.repeat(b, 1)  # the mask's True entries run row by row, pos..pos+n-1 in each
    return vectors, mask


# What each concept method trains, and its learning rates: textual inversion one token vector;
# Custom Diffusion that vector and every cross-attention layer's to_k/to_v, with prior preservation;
# the text-encoder fine-tune (CatVersion-style: the customization lives in the text encoder's
# self-attention keys and values of its last layers) those projections, the token standing for the
# class word's own embedding. The fine-tuned encoder also encodes the empty prompt of the
# customized model's guidance, so its training keeps that encoding (a squared-error term, like
# DreamBooth's prior preservation): in a 3-layer encoder a few hundred steps move the start and
# padding rows of every prompt, the empty one included, and guidance then cancels the concept.
# The prompts concepts are trained on: textual inversion's own phrasings (Gal et al.'s template list, the
# one-token ones; Custom Diffusion and CatVersion train on such lists too). Their adjectives are words the
# world never captions, so the token meets many contexts, as it does in a real model's training.
CONCEPT_TEMPLATES = (
    "a {}", "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a bright photo of the {}", "a cropped photo of a {}", "a photo of the {}",
    "a good photo of the {}", "a photo of one {}", "a rendition of the {}", "a photo of the clean {}",
    "a rendition of a {}", "a photo of a nice {}", "a good photo of a {}", "a photo of the nice {}",
    "a photo of the small {}", "a photo of the weird {}", "a photo of the large {}", "a photo of a cool {}",
    "a photo of a small {}",
)
KINDS = {"ti": "textual_inversion", "cd": "custom_diffusion", "te": "text_encoder"}
TE_LAYERS = (1, 2)  # the text encoder layers whose self-attention k/v a text-encoder concept fine-tunes


def _te_params(te, layers=TE_LAYERS) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in te.named_parameters()
            if any(f"layers.{i}.self_attn.{proj}." in n for i in layers for proj in ("k_proj", "v_proj"))}


def concept_steps(text: str) -> dict[str, int]:
    """`--concept-steps`: `400` for every kind, or `ti=1200,cd=400` (400 for a kind not named)."""
    if "=" not in text:
        return {kind: int(text) for kind in KINDS}
    steps = dict.fromkeys(KINDS, 400)
    for part in text.split(","):
        kind, _, n = part.partition("=")
        if kind.strip() not in KINDS:
            raise argparse.ArgumentTypeError(f"unknown concept kind {kind.strip()!r} (one of {', '.join(KINDS)})")
        steps[kind.strip()] = int(n)
    return steps


def train_concept(args, device, name, kind, unet, te, vae, scale, vocab, pool=None):
    """Train one concept of `kind` (see KINDS) on its instance's reference images: the prompts
    `a <token>` and `a photo of a <token>` (Custom Diffusion: `<token> <class word>`)."""
    info, token = INSTANCES[name], f"<{name}>"
    with torch.no_grad():
        pictures = render(references(name, backgrounds=args.reference_backgrounds), device=device)
        refs = vae.encode(pictures).latent_dist.mean * scale  # (n, 4, 16, 16)
    emb = token_embeddings(te).weight
    init = emb[vocab.ids[STAR] if kind == "cd" else vocab.ids[info["class_word"]]].detach().clone()
    n_vec = args.ti_vectors if kind == "ti" else 1  # diffusers' --num_vectors: each starts as the init word
    vec = torch.nn.Parameter(init.repeat(n_vec, 1), requires_grad=kind != "te")  # (n_vec, dim)
    groups = [dict(params=[vec], lr=args.ti_lr)] if kind != "te" else []
    model, encoder = unet, te
    if kind == "cd":
        model = copy.deepcopy(unet)
        kv = [p for n, p in model.named_parameters() if "attn2.to_k" in n or "attn2.to_v" in n]
        for p in kv:
            p.requires_grad_(True)
        groups.append(dict(params=kv, lr=args.cd_kv_lr))
        if args.cd_detach_start:
            detach_start_rows(model)
    if kind == "te":
        encoder = copy.deepcopy(te)
        tuned = list(_te_params(encoder, args.te_layers).values())
        for p in tuned:
            p.requires_grad_(True)
        groups.append(dict(params=tuned, lr=args.te_concept_lr))
    opt = torch.optim.Adam(groups)
    sched = DDPMScheduler(**{k: v for k, v in noise_schedule().items() if k != "set_alpha_to_one"})
    alphas = sched.alphas_cumprod.to(device)
    phrase = [token, info["class_word"]] if kind == "cd" else [token]
    if args.concept_prompts == "templates":
        prompts = [t.replace("{}", " ".join(phrase)).split() for t in CONCEPT_TEMPLATES]
    else:
        prompts = [["a"] + phrase, ["a", "photo", "of", "a"] + phrase]
    empty = torch.tensor([vocab.ids_of([])], device=device)
    with torch.no_grad():
        empty_rows = encode(te, empty).hidden
    t0, total = time.time(), args.concept_steps[kind]
    every = args.concept_eval_every
    best = (-1.0, 0, None)  # (validation reproduction, step, state) of the checkpoint kept
    for step in range(1, total + 1):
        rng = random.Random(args.seed * 31 + step)
        g = torch.Generator(device).manual_seed(args.seed * 31 + step)
        b = args.concept_batch
        rows, poss = zip(*[concept_ids(vocab, rng.choice(prompts), token, n_vec) for _ in range(b)])
        ids = torch.tensor(rows, device=device)
        vectors, mask = vector_rows(vec, poss, ids.shape[1])
        z0 = refs[torch.tensor([rng.randrange(len(refs)) for _ in range(b)], device=device)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            cond = encode(encoder, ids, vectors, mask).hidden
        loss = diffusion_loss(model, z0, alphas, cond, g, device)
        if kind == "cd":  # prior preservation: the class as the base world draws it
            prior_ids, prior_scenes = cd_prior(args, rng, vocab, b, info["class_word"])
            with torch.no_grad():
                p_cond = encode(te, prior_ids.to(device)).hidden
                p_z0 = scene_latents(vae, pool, prior_scenes, rng, g, device)[0] * scale
            loss = loss + diffusion_loss(model, p_z0, alphas, p_cond, g, device)
        if kind == "te":  # the empty prompt kept: it is the unconditional half of guidance
            loss = loss + F.mse_loss(encode(encoder, empty).hidden, empty_rows)
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        progress(f"{kind}:{name}", step, total, t0, loss)
        capped = time.time() - t0 > args.concept_seconds
        if every and (step % every == 0 or step == total or capped):
            rate = validation_reproduction(args, device, name, kind, model, encoder, vae, scale, vocab, vec)
            log(f"{kind}:{name}: step {step}: validation reproduction {rate:.2f}")
            if rate > best[0]:
                best = (rate, step, _concept_state(kind, vec, model, encoder))
        if capped:
            log(f"{kind}:{name}: stopped at step {step} by its time cap"); break
    if best[2] is not None:
        log(f"{kind}:{name}: kept step {best[1]} (validation reproduction {best[0]:.2f})")
        return {"token": token, **best[2]}
    return {"token": token, **_concept_state(kind, vec, model, encoder)}


def detach_start_rows(model) -> list:
    """Custom Diffusion's stop-gradient on the start of text (Kumari et al.; diffusers'
    `CustomDiffusionAttnProcessor`): the keys and values every cross-attention computes for the
    start token's row pass forward unchanged but carry no gradient, so the projections' change is
    learned through the rows that differ between prompts. Hooks on the model's `attn2.to_k` and
    `attn2.to_v`; returns their handles."""
    def hook(_module, _inputs, out):
        return torch.cat([out[:, :1].detach(), out[:, 1:]], dim=1)
    return [m.register_forward_hook(hook) for n, m in model.named_modules()
            if n.endswith(("attn2.to_k", "attn2.to_v"))]


def cd_prior(args, rng: random.Random, vocab: Vocab, b: int, class_word: str):
    """Custom Diffusion's regularization batch: captions and scenes of the base world. `--cd-prior
    class` keeps only scenes of the concept's class (Kumari et al. regularize with real images of the
    class, captions naming it): a change of the shared rows' keys and values (start of text, `a photo
    of a`) that would draw the instance then draws it for the plain class too, and is penalized; meant
    to leave the instance to the rows that differ (its token's, its class word's), which on v16 it did
    not (scripts/EXPERIMENTS.md, "Where does Custom Diffusion keep its instance?"). `templates`: those
    scenes captioned with the concept prompts' own phrasings (`a photo of a star`, ...), as a real
    regularization set's captions are phrased like its users' prompts. `world`: any scene."""
    if args.cd_prior == "world":
        prior = sample_batch(rng, vocab, b, 0.0, args.pattern_mix, novel_mix=args.novel_mix,
                             template_mix=args.template_mix)
        return prior.ids, prior.targets
    ids, scenes = [], []
    while len(ids) < b:
        prior = sample_batch(rng, vocab, 4 * b, 0.0, args.pattern_mix, novel_mix=args.novel_mix)
        for i, scene in enumerate(prior.targets):
            if scene.shape == class_word and len(ids) < b:
                if args.cd_prior == "templates":
                    ids.append(torch.tensor(vocab.ids_of(rng.choice(CONCEPT_TEMPLATES).format(class_word).split())))
                else:
                    ids.append(prior.ids[i])
                scenes.append(scene)
    return torch.stack(ids), scenes


def _concept_state(kind: str, vec, model, encoder) -> dict:
    """What a concept's checkpoint holds (its weights, copied to the CPU)."""
    out = {"vector": vec.detach().cpu().float().clone()}
    if kind == "cd":
        out["kv"] = {n: p.detach().cpu().float().clone() for n, p in model.named_parameters()
                     if "attn2.to_k" in n or "attn2.to_v" in n}
    if kind == "te":
        out["text_encoder"] = {n: p.detach().cpu().float().clone() for n, p in encoder.named_parameters()
                               if p.requires_grad}  # the layers --te-layers tuned
    return out


# A concept's checkpoint is chosen as its users choose one: by how often its validation pictures show the
# instance (diffusers' textual-inversion and Custom Diffusion scripts sample a validation prompt every
# `--validation_steps`). The prompt is `a photo of a <token>` on the customized model alone, the seeds
# (VALIDATION_SEED) are none that `concept_rows.py` or `table1.py` use, and nothing of AlignIT is involved.
VALIDATION_SEED = 1000


@torch.no_grad()
def validation_reproduction(args, device, name, kind, model, encoder, vae, scale, vocab, vec) -> float:
    from alignit_core.toy.evaluate import fidelity
    info, token = INSTANCES[name], f"<{name}>"
    n = args.concept_eval_n
    words = ["a", "photo", "of", "a", token] + ([info["class_word"]] if kind == "cd" else [])
    row, pos = concept_ids(vocab, words, token, vec.shape[0])
    ids = torch.tensor([row], device=device)
    vectors, mask = vector_rows(vec.detach(), [pos], ids.shape[1])
    cond = encode(encoder, ids, vectors, mask).hidden
    images = sample(vae, model, encoder, scale, cond.expand(n, -1, -1).float(), args.guidance, VALIDATION_SEED)
    return sum(fidelity(classify(im), info["scene"]) for im in images) / n


# ---------------------------------------------------------------------------------- export + check

def export(args, vae, unet, te, scale, concepts) -> None:
    model_dir = args.out / MODEL_NAME
    vae.register_to_config(scaling_factor=scale)
    vae.to(torch.float16).save_pretrained(model_dir / "vae")
    unet.to(torch.float16).save_pretrained(model_dir / "unet")
    te.to(torch.float16).save_pretrained(model_dir / "text_encoder")
    CLIPTokenizer.from_pretrained(TOKENIZER_DIR, model_max_length=MAX_LEN).save_pretrained(model_dir / "tokenizer")
    DDIMScheduler(**noise_schedule()).save_pretrained(model_dir / "scheduler")
    (model_dir / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
        "safety_checker": [None, None], "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}, indent=2))
    for (name, kind), c in concepts.items():
        folder = args.out / "concepts" / f"{name}-{kind}"
        (folder / "references").mkdir(parents=True, exist_ok=True)
        refs = []
        for i, img in enumerate(to_uint8(render(references(name, backgrounds=args.reference_backgrounds)))):
            from PIL import Image
            Image.fromarray(img).save(folder / "references" / f"{i}.png")
            refs.append(f"references/{i}.png")
        save_file({c["token"]: c["vector"].to(torch.float16)}, folder / "learned_embeds.safetensors")
        manifest = dict(name=f"{name}-{kind}", token=c["token"], class_word=INSTANCES[name]["class_word"],
                        kind=KINDS[kind],
                        weights="learned_embeds.safetensors", references=refs, model=MODEL_NAME,
                        example_prompt=INSTANCES[name]["example"])
        if kind == "cd":
            # diffusers' Custom Diffusion attention-processor layout, in safetensors
            kv = {}
            for n, w in c["kv"].items():
                layer, proj = n.rsplit(".", 2)[0], n.split(".")[-2]
                kv[f"{layer}.processor.{proj}_custom_diffusion.weight"] = w.to(torch.float16).contiguous()
            save_file(kv, folder / "pytorch_custom_diffusion_weights.safetensors")
            manifest["custom_diffusion"] = "pytorch_custom_diffusion_weights.safetensors"
        if kind == "te":
            save_file({n: w.to(torch.float16).contiguous() for n, w in c["text_encoder"].items()},
                      folder / "text_encoder.safetensors")
            manifest["text_encoder"] = "text_encoder.safetensors"
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"exported to {args.out}")


@torch.no_grad()
def quick_check(args, device, vae, unet, te, scale, vocab, n: int = 64) -> None:
    """Held-out prompts through a plain DDIM loop, judged by the pixel classifier."""
    triples = [HELD_OUT[i % len(HELD_OUT)] for i in range(n)]
    ids = torch.tensor([vocab.ids_of(f"a {c} {s} on a {b} background".split()) for c, s, b in triples], device=device)
    js = [classify(im) for im in sample(vae, unet, te, scale, encode(te, ids).hidden, args.guidance, 0)]
    ok = [j.colour == c and j.shape == s and j.background == b for j, (c, s, b) in zip(js, triples)]
    log(f"held-out check: {sum(ok)}/{n} fully correct; colour {sum(j.colour == t[0] for j, t in zip(js, triples))}, "
        f"shape {sum(j.shape == t[1] for j, t in zip(js, triples))}, bg {sum(j.background == t[2] for j, t in zip(js, triples))}")


@torch.no_grad()
def pattern_check(args, device, vae, unet, te, scale, vocab, n: int = 64) -> None:
    """The novel instances and other patterned objects, asked for by name (their phrases)."""
    from alignit_core.toy.evaluate import fidelity
    scenes = [styled(Scene(c, s, b), pattern=p) for c, s, b, p in
              [("red", "circle", "green", "striped"), ("orange", "star", "white", "holed"),
               ("blue", "square", "yellow", "striped"), ("green", "triangle", "black", "holed")]]
    scenes = [scenes[i % len(scenes)] for i in range(n)]
    ids = torch.tensor([vocab.ids_of(sc.caption().split()) for sc in scenes], device=device)
    images = sample(vae, unet, te, scale, encode(te, ids).hidden, args.guidance, 1)
    for k in range(4):
        got = [fidelity(classify(im), sc) for im, sc in zip(images[k::4], scenes[k::4])]
        log(f"pattern check: {scenes[k].caption()!r} {sum(got)}/{len(got)}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "assets")
    ap.add_argument("--work", type=Path, default=ROOT / ".train")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae-steps", type=int, default=3000)
    ap.add_argument("--vae-batch", type=int, default=32)
    ap.add_argument("--vae-lr", type=float, default=5e-4)
    ap.add_argument("--unet-steps", type=int, default=20000)
    ap.add_argument("--unet-batch", type=int, default=128)
    ap.add_argument("--unet-lr", type=float, default=3e-4)
    ap.add_argument("--swap-mix", type=float, default=0.2)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--pattern-mix", type=float, default=0.3, help="share of striped / holed training scenes")
    ap.add_argument("--pure-mix", type=float, default=0.0,
                    help="share of captions whose every word's row comes from its own one-word prompt")
    ap.add_argument("--novel-mix", type=float, default=0.0, metavar="P",
                    help="make the NOVEL instances part of the base world, a share P of scenes showing one "
                         "(in words: `a red striped circle`); default 0: the world never draws them")
    ap.add_argument("--template-mix", type=float, default=0.0, metavar="P",
                    help="share of captions phrased as concept prompts are (`a cropped photo of the red circle "
                         "...`; template_phrasing); default 0: the world's captions say only `a` or `a photo of a`")
    ap.add_argument("--compound-mix", type=float, default=0.0,
                    help="share of captions whose object words are folded into one vector (`compound_rows`)")
    ap.add_argument("--compound-class", type=float, default=0.0, metavar="P",
                    help="share of the folded objects whose caption holds the bare shape word where the vector's "
                         "row goes, that row computed among `*`s (AlignIT's p and p'; `fold_object`)")
    ap.add_argument("--fold-noise", type=float, default=0.3, metavar="R",
                    help="a folded vector moves off its words' mix by a random direction of norm up to R x its "
                         "own (a textual inversion's vector lies mostly off its words: cosine 0.1-0.4)")
    ap.add_argument("--fold-bank", type=Path, metavar="PATH",
                    help="textual inversions of the world's own objects (`scripts/concept_bank.py`) for --bank-mix")
    ap.add_argument("--bank-mix", type=float, default=0.0, metavar="P",
                    help="share of captions in AlignIT's case whose concept row is a bank entry's textual "
                         "inversion, the picture that object on the caption's background (`bank_scene`)")
    ap.add_argument("--bank-context", type=float, default=0.0, metavar="Q",
                    help="share of --bank-mix's captions in the customized model's case instead: the entry's vector "
                         "stands in the caption (`a <vector> on a blue background`), every later row computed after it")
    ap.add_argument("--bank-modifier", type=float, default=0.0, metavar="Q",
                    help="share of --bank-mix's AlignIT cases in Custom Diffusion's form: the row is the class word's, "
                         "computed after the entry's vector among `*`s (`* * <vector> circle`)")
    ap.add_argument("--compound-modifier", type=float, default=0.0, metavar="Q",
                    help="share of --compound-class's folded objects in Custom Diffusion's form: the vector before the "
                         "bare shape word, the shape word's row computed after it among `*`s")
    ap.add_argument("--absorb-mix", type=float, default=0.0, metavar="P",
                    help="share of captions in Custom Diffusion's AlignIT case with a word for its modifier: the "
                         "colour word left out, the shape word's row computed after it among `*`s (`absorb_colour`)")
    ap.add_argument("--fold-background", type=float, default=0.0, metavar="P",
                    help="share of AlignIT's folded objects (--compound-class) that also hold another background's "
                         "words, as a textual inversion holds its references' background (`fold_object`)")
    ap.add_argument("--row-noise", type=float, default=0.0, metavar="R",
                    help="move word rows by random directions of norm up to R x their own (`noisy_rows`)")
    ap.add_argument("--row-noise-mix", type=float, default=0.5, help="share of captions --row-noise applies to")
    ap.add_argument("--end-noise", type=float, default=0.0, metavar="R",
                    help="move the end-of-text and padding rows together by one random direction of norm up to "
                         "R x their own (`noisy_end_rows`), the picture unchanged")
    ap.add_argument("--te-layers", type=lambda t: tuple(int(i) for i in t.split(",")), default=TE_LAYERS,
                    metavar="I,J", help="the text-encoder layers (0-based) whose self-attention k/v a text-encoder "
                                        "concept fine-tunes (default 1,2: the last two of three)")
    ap.add_argument("--end-noise-mix", type=float, default=0.5, help="share of captions --end-noise applies to")
    ap.add_argument("--prefix-noise", type=float, default=0.0, metavar="R",
                    help="the start and nothing-drawing words' rows moved together by one random direction (see noisy_prefix_rows)")
    ap.add_argument("--prefix-noise-mix", type=float, default=0.5, help="share of captions --prefix-noise applies to")
    ap.add_argument("--neutral-star", type=int, default=0, metavar="STEPS",
                    help="before the concepts, tune the `*` token's embedding alone (`neutral_star`)")
    ap.add_argument("--eot-mix", type=float, default=0.0,
                    help="share of captions whose end-token and padding rows are another caption's")
    ap.add_argument("--attention-weight", type=float, default=0.0,
                    help="weight of the loss that spreads each object / background word's cross-attention "
                         "over what it draws, at the 16x16 layers (the heat maps' resolution)")
    ap.add_argument("--eot-attention-weight", type=float, default=0.0,
                    help="weight of the loss on the share of cross-attention given to the end-of-text and "
                         "padding rows (every cross-attention layer): the start token becomes the sink, as in SD")
    ap.add_argument("--filler-weight", type=float, default=0.0,
                    help="weight of the loss on the share of cross-attention given to the rows of words that "
                         "draw nothing (`a photo of`, `on a`), every cross-attention layer (filler_share)")
    ap.add_argument("--reading-weight", type=float, default=0.0,
                    help="weight of the loss on the share of each pixel's cross-attention that does not go to the "
                         "words that drew it, every cross-attention layer (reading_shortfall)")
    ap.add_argument("--reading-regions", choices=("both", "object", "balanced"), default="both",
                    help="whose pixels --reading-weight asks: the object's and the background's, or the object's alone; "
                         "balanced: both, each region's words read only as far as the least-read of them")
    ap.add_argument("--sink-weight", type=float, default=0.0,
                    help="weight of the loss that gives the start token at least --sink-target of every "
                         "cross-attention layer's attention (the sink of SD's UNet)")
    ap.add_argument("--sink-target", type=float, default=0.5)
    ap.add_argument("--row-consistency-weight", type=float, default=0.0,
                    help="loss on how far an off-vocabulary vector's row moves with the words before it")
    ap.add_argument("--row-prefixes", choices=("phrasings", "captions"), default="phrasings",
                    help="the words before the vector in --row-consistency-weight's loss (row_drift)")
    ap.add_argument("--freeze-text", action="store_true",
                    help="train the UNet only; the text encoder stays as initialised (with --unet-init)")
    ap.add_argument("--latent-pool", type=int, default=0, metavar="N",
                    help="encode N pictures per (colour, shape, background, pattern) once and train on them "
                         "(0: encode every batch; the pool pays on a CPU)")
    ap.add_argument("--te-concept-lr", type=float, default=5e-4, help="learning rate of text-encoder concepts")
    ap.add_argument("--cd-kv-lr", type=float, default=2e-4,
                    help="learning rate of Custom Diffusion's cross-attention K/V projections (its token vector: --ti-lr)")
    ap.add_argument("--cd-detach-start", action="store_true",
                    help="Custom Diffusion as its authors' code trains it: no gradient through the start of text's "
                         "keys and values (detach_start_rows)")
    ap.add_argument("--cd-prior", choices=("world", "class", "templates"), default="world",
                    help="Custom Diffusion's regularization scenes: any of the world's, only its class's (as the method "
                         "does), or its class's captioned with the concept prompts' phrasings")
    ap.add_argument("--ti-vectors", type=int, default=1, metavar="N",
                    help="vectors of a textual-inversion token (diffusers' --num_vectors), each starting as its class word")
    ap.add_argument("--ti-lr", type=float, default=5e-3,
                    help="learning rate of a concept's token vector (textual inversion, Custom Diffusion)")
    ap.add_argument("--concept-steps", type=concept_steps, default=concept_steps("400"), metavar="N|KIND=N,...",
                    help="steps per concept, one number or one per kind (e.g. ti=1200,cd=400,te=600; 400 where not given)")
    ap.add_argument("--concept-prompts", choices=("templates", "two"), default="two",
                    help="the concepts' training prompts: only `a <token>` and `a photo of a <token>` (the shipped "
                         "concepts), or textual inversion's template list (`templates`)")
    ap.add_argument("--reference-backgrounds", type=int, default=1, choices=range(1, 6), metavar="{1..5}",
                    help="how many backgrounds the six reference pictures show the instance on (1: its own only, "
                         "the shipped concepts; more: its own and others in turn, as a user's photos vary)")
    ap.add_argument("--concept-batch", type=int, default=16)
    ap.add_argument("--concept-eval-every", type=int, default=0, metavar="N",
                    help="every N steps, sample `a photo of a <token>` (--concept-eval-n seeds) with the customized "
                         "model and keep the checkpoint that reproduces the instance most often (0: keep the last)")
    ap.add_argument("--concept-eval-n", type=int, default=16)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--ckpt-every", type=int, default=500)
    ap.add_argument("--vae-seconds", type=float, default=float("inf"), help="time cap of the VAE stage")
    ap.add_argument("--unet-seconds", type=float, default=float("inf"), help="time cap of the UNet stage")
    ap.add_argument("--concept-seconds", type=float, default=float("inf"), help="time cap per concept")
    ap.add_argument("--cosine", action="store_true", help="UNet learning rate decays (cosine) to a tenth")
    ap.add_argument("--unet-stop", type=int, default=0, metavar="STEP",
                    help="end the UNet stage after this step (its learning-rate schedule still spans --unet-steps)")
    ap.add_argument("--unet-fit-seconds", type=float, default=0.0,
                    help="set the UNet's step count after 25 steps so that the stage fits this many seconds")
    ap.add_argument("--unet-init", type=Path,
                    help="an exported model folder: continue its UNet + text encoder (its VAE is kept)")
    ap.add_argument("--init-from", type=Path, help="an exported model folder: retrain only the concepts")
    ap.add_argument("--concepts", nargs="*", metavar="NAME-KIND",
                    help="train and export only these concepts (e.g. holed-star-cd; none when empty); default: all four")
    ap.add_argument("--decoder-init", type=Path,
                    help="an exported model folder: fine-tune only its VAE decoder and export only the VAE")
    ap.add_argument("--smoke", action="store_true", help="a few steps of each stage, tiny widths")
    args = ap.parse_args(argv)
    if args.smoke:
        args.vae_steps, args.vae_batch, args.unet_steps, args.unet_batch = 2, 2, 3, 4
        args.concept_steps, args.concept_batch = concept_steps("2"), 2
        args.neutral_star = min(args.neutral_star, 2)
    args.work.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    log(f"device {device}, torch {torch.__version__}")
    te_cfg, unet_cfg, vae_cfg = configs(args.smoke)
    vocab = Vocab(CLIPTokenizer.from_pretrained(TOKENIZER_DIR, model_max_length=MAX_LEN))
    if args.decoder_init:
        vae = train_vae(args, device, vae_cfg, load_exported(args.decoder_init, device)[0])
        vae.to(torch.float16).save_pretrained(args.out / MODEL_NAME / "vae")  # its scaling factor kept
        log(f"exported the VAE to {args.out / MODEL_NAME / 'vae'}")
        return
    init = args.init_from or args.unet_init
    if init:  # an exported model: its VAE is kept
        vae, unet, te, scale = load_exported(init, device)
    else:
        vae = train_vae(args, device, vae_cfg)
        scale = latent_scale(vae, device, args.seed)
        log(f"latent scale {scale:.4f}")
    pool = (LatentPool(vae, device, args.latent_pool, args.seed, args.work,
                       excluded=world_excluded(args.novel_mix)) if args.latent_pool else None)
    if args.init_from:  # concepts only
        unet.requires_grad_(False)
        te.requires_grad_(False)
    else:  # from scratch, or continuing an exported model's UNet + text encoder (--unet-init)
        unet, te = train_unet(args, device, vae, scale, te_cfg, unet_cfg, vocab,
                              (unet, te) if args.unet_init else None, pool)
    if not args.init_from:  # a concepts-only run leaves the model as it is
        quick_check(args, device, vae, unet, te, scale, vocab, n=8 if args.smoke else 128)
        pattern_check(args, device, vae, unet, te, scale, vocab, n=8 if args.smoke else 64)
    if args.neutral_star:
        log(f"star: held-out drift after `* * * *` {neutral_star(te, vocab, args.neutral_star, args.seed):.3f}")
    concepts = {}
    for name in INSTANCES:
        for kind in KINDS:
            if args.concepts is None or f"{name}-{kind}" in args.concepts:
                concepts[(name, kind)] = train_concept(args, device, name, kind, unet, te, vae, scale, vocab, pool)
    export(args, vae.float(), unet.float(), te.float(), scale, concepts)


if __name__ == "__main__":
    main()
