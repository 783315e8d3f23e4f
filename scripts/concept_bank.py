"""A bank of textual inversions of the base world's own objects, for `train_embedded.py --fold-bank`.

A textual inversion's vector is not a mix of its instance's words: it lies mostly off them, several times a
word's norm, and it also says its references' background. `--compound-class` teaches the UNet AlignIT's case
with folded word mixes; the bank lets it meet vectors made the way a user's are. Each entry is an object the
world already draws (`a blue striped square`, never a NOVEL instance), photographed six times on one background,
and inverted by textual inversion's own objective (`a <token>`, `a photo of a <token>`, the base frozen) into
one vector. Nothing here sees a shipped concept, its references or AlignIT.

    python scripts/concept_bank.py --init assets/embedded-shapes --out bank.pt --size 16 --steps 1200

Seeded and resumable (a checkpoint every --ckpt-every steps next to --out); `--smoke` runs two steps.
"""
from __future__ import annotations

import argparse
import random
import time
from dataclasses import replace
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from transformers import CLIPTokenizer

from alignit_core.encoding import encode, token_embeddings
from alignit_core.toy.evaluate import instance_words
from alignit_core.toy.instances import object_colours
from alignit_core.toy.sampling import MAX_LEN, load_exported, noise_schedule
from alignit_core.toy.shapes import COLOURS, NOVEL, PATTERNS, SHAPES, Scene, render, styled, training_triples
from scripts.train_embedded import STAR, TOKENIZER_DIR, Vocab, diffusion_loss, log, progress

PROMPTS = (["a", STAR], ["a", "photo", "of", "a", STAR])


def bank_instances(n: int, seed: int) -> list[Scene]:
    """`n` objects of the base world (two in three patterned, none NOVEL), each on a background that is none
    of its own colours and makes a training triple."""
    rng, triples, out = random.Random(seed * 6271), set(training_triples()), []
    while len(out) < n:
        colour, shape = rng.choice(sorted(COLOURS)), rng.choice(sorted(SHAPES))
        pattern = rng.choice(("plain",) + PATTERNS * 2)
        if (colour, shape, pattern) in NOVEL or any((colour, shape) == (s.colour, s.shape) for s in out):
            continue
        scene = styled(Scene(colour, shape, "black" if colour != "black" else "white"), pattern=pattern)
        grounds = [b for b in COLOURS if (colour, shape, b) in triples and b not in object_colours(scene)]
        out.append(styled(scene, background=rng.choice(grounds)))
    return out


def photographs(scene: Scene, seed: int, n: int = 6) -> list[Scene]:
    """The entry's `n` reference pictures: the object a little moved and resized, as a concept's are."""
    rng = random.Random(seed)
    return [replace(scene, cx=rng.uniform(-0.1, 0.1), cy=rng.uniform(-0.1, 0.1), radius=rng.uniform(0.5, 0.6))
            for _ in range(n)]


def train_bank(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vae, unet, te, scale = load_exported(args.init, device)
    unet.requires_grad_(False); te.requires_grad_(False); vae.requires_grad_(False)
    vocab = Vocab(CLIPTokenizer.from_pretrained(TOKENIZER_DIR, model_max_length=MAX_LEN))
    scenes = bank_instances(args.size, args.seed)
    with torch.no_grad():
        refs = torch.stack([vae.encode(render(photographs(s, args.seed + i), device=device)).latent_dist.mean * scale
                            for i, s in enumerate(scenes)])  # (size, 6, 4, h, w)
    emb = token_embeddings(te).weight
    vec = torch.nn.Parameter(torch.stack([emb[vocab.ids[s.shape]] for s in scenes]).detach().clone())
    opt = torch.optim.Adam([vec], lr=args.lr)
    alphas = DDPMScheduler(**{k: v for k, v in noise_schedule().items() if k != "set_alpha_to_one"}) \
        .alphas_cumprod.to(device)
    ckpt, start = args.out.with_suffix(".ckpt"), 0
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        with torch.no_grad():
            vec.copy_(state["vectors"])
        opt.load_state_dict(state["opt"]); start = state["step"]
    t0 = time.time()
    for step in range(start + 1, args.steps + 1):
        rng = random.Random(args.seed * 7919 + step)
        g = torch.Generator(device).manual_seed(args.seed * 7919 + step)
        entry = [k for k in range(args.size) for _ in range(args.batch)]
        words = [rng.choice(PROMPTS) for _ in entry]
        ids = torch.tensor([vocab.ids_of(w) for w in words], device=device)
        pos = torch.tensor([len(w) for w in words], device=device)  # the token's row (after the start token)
        rows = torch.arange(len(entry), device=device)
        mask = torch.zeros(ids.shape, dtype=torch.bool, device=device)
        mask[rows, pos] = True
        vectors = vec[torch.tensor(entry, device=device)].unsqueeze(1).expand(-1, ids.shape[1], -1)
        z0 = refs[torch.tensor(entry, device=device), torch.tensor([rng.randrange(refs.shape[1]) for _ in entry],
                                                                    device=device)]
        loss = diffusion_loss(unet, z0, alphas, encode(te, ids, vectors, mask).hidden, g, device)
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        progress("bank", step, args.steps, t0, loss)
        if step % args.ckpt_every == 0 or step == args.steps:
            torch.save(dict(vectors=vec.detach().cpu(), opt=opt.state_dict(), step=step), ckpt)
    words = torch.stack([sum(emb[vocab.ids[w]] for w in instance_words(s).split()) for s in scenes]).cpu()
    v = vec.detach().cpu()
    log(f"bank: norms {v.norm(dim=1).mean():.2f} (a word {emb.norm(dim=1).mean():.2f}), cosine with the words "
        f"{torch.nn.functional.cosine_similarity(v, words).mean():.2f}")
    return dict(vectors=v, scenes=scenes)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", type=Path, required=True, help="an exported model folder (its UNet and encoder frozen)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--size", type=int, default=16, help="how many objects the bank inverts")
    ap.add_argument("--steps", type=int, default=1200, help="textual inversion's")
    ap.add_argument("--batch", type=int, default=4, help="pictures of each object a step")
    ap.add_argument("--lr", type=float, default=5e-3, help="textual inversion's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    if args.smoke:
        args.size, args.steps, args.batch = 3, 2, 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(train_bank(args), args.out)
    log(f"bank: wrote {args.out}")


if __name__ == "__main__":
    main()
