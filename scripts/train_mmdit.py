"""Train the embedded MMDiT model: a small SD3-architecture transformer on the shapes world.

    python scripts/train_mmdit.py --out assets                 # resumable; writes assets/embedded-mmdit
    python scripts/train_mmdit.py --smoke --out /tmp/x          # seconds-long check of every stage

It starts from the embedded UNet model's VAE and CLIP text encoder (`assets/embedded-shapes`), both frozen,
as SD3 freezes its encoders: SD3's two CLIP encoders are this one encoder twice (its penultimate layer,
as SD3 reads them), with zero text projections, so the pooled vector is the same for every prompt and
nothing of a prompt reaches the picture but its rows. No T5: the pipeline feeds zeros in its place
(one row by default, `DEFAULT_TEXT_ROWS`). Only the transformer is trained, with SD3's rectified-flow
objective (v = noise - x0, logit-normal times) on the same batches as the UNet (`train_embedded.py`):
--swap-mix, --pure-mix and --eot-mix teach it to read each word from its own row, as a large model does,
which is what token swaps and AlignIT rely on. The export is a StableDiffusion3Pipeline folder whose
VAE and tokenizer files are links to the UNet model's; the encoder it was trained with is copied into it
(`text_encoder/`, with `text_encoder_2/` linking there), so a later UNet model with another encoder leaves it
as it was trained.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPTokenizer

from alignit_core.encoding import encode
from alignit_core.families import EMBEDDED_MMDIT_DEFAULTS
from alignit_core.toy.sampling import MAX_LEN, load_exported
from alignit_core.toy.instances import INSTANCES, references
from alignit_core.toy.shapes import COLOURS, HELD_OUT, SHAPES, classify, render, to_uint8

try:  # imported as scripts.train_mmdit (the tests)
    from scripts.train_embedded import (TOKENIZER_DIR, LatentPool, Vocab, concept_ids, condition, ema_step,
                                        load_ckpt, log, progress, sample_batch, save_ckpt, scene_latents)
except ModuleNotFoundError:  # run as a script: scripts/ is on the path
    from train_embedded import (TOKENIZER_DIR, LatentPool, Vocab, concept_ids, condition, ema_step, load_ckpt, log,
                                progress, sample_batch, save_ckpt, scene_latents)

ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "embedded-mmdit"
UNET_MODEL = "embedded-shapes"
DEFAULT_TEXT_ROWS = EMBEDDED_MMDIT_DEFAULTS.text_rows  # zero rows where T5 would be (max_sequence_length)


def transformer_config(smoke: bool) -> dict:
    return dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4,
                num_layers=2 if smoke else 6, attention_head_dim=32, num_attention_heads=2 if smoke else 4,
                joint_attention_dim=128, caption_projection_dim=64 if smoke else 128, pooled_projection_dim=128,
                pos_embed_max_size=16, qk_norm="rms_norm")


def joint(h: torch.Tensor) -> torch.Tensor:
    """SD3's joint text rows from the encoder's penultimate-layer rows `h` (n, 77, 64): [CLIP-L ; CLIP-G]
    (this encoder twice), then the zero rows where T5 would be."""
    h = torch.cat([h, h], dim=-1)
    return torch.cat([h, h.new_zeros(h.shape[0], DEFAULT_TEXT_ROWS, h.shape[-1])], dim=1)


def text_rows(te, batch) -> torch.Tensor:
    """The batch's joint text rows, with the rows its mixes take from elsewhere (train_embedded.condition)."""
    return joint(condition(te, batch, penultimate=True))


def prompt_rows(te, ids: torch.Tensor) -> torch.Tensor:
    return joint(encode(te, ids, penultimate=True).hidden)


def flow_loss(model, z0: torch.Tensor, cond: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """SD3's rectified-flow loss: z = (1 - s) z0 + s noise at logit-normal times s, target v = noise - z0;
    the pooled vector is zero (the encoders' projections are)."""
    noise = torch.randn(z0.shape, generator=g, device=z0.device)
    sigma = torch.sigmoid(torch.randn(z0.shape[0], generator=g, device=z0.device))
    zt = (1 - sigma.view(-1, 1, 1, 1)) * z0 + sigma.view(-1, 1, 1, 1) * noise
    pooled = z0.new_zeros(z0.shape[0], model.config.pooled_projection_dim)
    with torch.autocast(z0.device.type, dtype=torch.bfloat16, enabled=z0.device.type == "cuda"):
        pred = model(zt, encoder_hidden_states=cond, pooled_projections=pooled, timestep=sigma * 1000).sample
    return F.mse_loss(pred.float(), noise - z0)


def lr_at(args, step: int, total: int) -> float:
    lr = args.lr * min(1.0, step / 200)
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(step / max(total, 1), 1.0))))


def train(args, device, vae, scale, te, vocab, pool):
    torch.manual_seed(args.seed)
    model = SD3Transformer2DModel(**transformer_config(args.smoke)).to(device).train()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    ema = [p.detach().clone() for p in params]
    start, total = 0, args.steps
    ck = load_ckpt(args.work, "mmdit")
    if ck:
        model.load_state_dict(ck["model"]); opt.load_state_dict(ck["opt"])
        ema = [e.to(device) for e in ck["ema"]]; start = ck["step"]
    log(f"transformer: {sum(p.numel() for p in params) / 1e6:.2f} M weights, from step {start} to {total}")
    t0, step = time.time(), start
    while step < total:
        step += 1
        rng = random.Random(args.seed * 104729 + step)
        batch = sample_batch(rng, vocab, args.batch, args.swap_mix, args.pattern_mix, args.pure_mix, args.eot_mix)
        g = torch.Generator(device).manual_seed(args.seed * 104729 + step)
        z0, _ = scene_latents(vae, pool, batch.targets, rng, g, device)
        for group in opt.param_groups:
            group["lr"] = lr_at(args, step, total)
        with torch.no_grad():
            cond = text_rows(te, batch)
        loss = flow_loss(model, z0 * scale, cond, g)
        ema_step(opt, params, ema, loss, step, args.ema)
        progress("mmdit", step, total, t0, loss)
        over = time.time() - t0 > args.seconds
        if step % args.ckpt_every == 0 or step == total or over:
            save_ckpt(args.work, "mmdit", dict(model=model.state_dict(), opt=opt.state_dict(),
                                               ema=[e.cpu() for e in ema], step=step))
            if args.check_every and step % args.check_every == 0 and step != total:
                check(args, device, vae, scale, te, vocab, ema_copy(model, ema), n=32)
            if over:
                log(f"mmdit: stopped at step {step} by its time cap"); break
    return ema_copy(model, ema)


def ema_copy(model, ema):
    out = SD3Transformer2DModel(**model.config).to(next(model.parameters()).device)
    with torch.no_grad():
        for p, e in zip(out.parameters(), ema):
            p.copy_(e)
    return out.eval().requires_grad_(False)


@torch.no_grad()
def sample(model, vae, scale, cond, uncond, guidance: float, seed: int, steps: int = 20):
    """Euler steps on SD3's flow (shift 1) with classifier-free guidance; uint8 images (n, H, W, 3)."""
    n, device = cond.shape[0], cond.device
    z = torch.randn((n, 4, 16, 16), generator=torch.Generator(device).manual_seed(seed), device=device)
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    pooled = torch.zeros(2 * n, model.config.pooled_projection_dim, device=device)
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        t = torch.full((2 * n,), float(s) * 1000, device=device)
        vu, vc = model(torch.cat([z, z]), encoder_hidden_states=torch.cat([uncond, cond]), pooled_projections=pooled,
                       timestep=t).sample.chunk(2)
        z = z + (s_next - s) * (vu + guidance * (vc - vu))
    return to_uint8(vae.decode(z / scale).sample.float())


@torch.no_grad()
def check(args, device, vae, scale, te, vocab, model, n: int = 64) -> dict:
    """Held-out prompts, and colour and shape swaps made by replacing the word's input row (the
    first block's view of a swap), judged by the pixel classifier."""
    triples = [HELD_OUT[i % len(HELD_OUT)] for i in range(n)]
    ids = torch.tensor([vocab.ids_of(f"a {c} {s} on a {b} background".split()) for c, s, b in triples], device=device)
    uncond = prompt_rows(te, torch.tensor([vocab.ids_of([])] * n, device=device))
    cond = prompt_rows(te, ids)
    js = [classify(im) for im in sample(model, vae, scale, cond, uncond, args.guidance, 0)]
    held = [sum(getattr(j, a) == t[k] for j, t in zip(js, triples)) / n for k, a in
            enumerate(("colour", "shape", "background"))]
    swaps = {}
    for k, attr in ((1, "colour"), (2, "shape")):
        rng = random.Random(k)
        values = COLOURS if attr == "colour" else SHAPES
        new = [rng.choice([v for v in values if v != t[k - 1] and (attr != "colour" or v != t[2])]) for t in triples]
        dummy = [["*"] * 7 for _ in triples]
        for d, v in zip(dummy, new):
            d[k] = v
        swapped = cond.clone()
        rows = prompt_rows(te, torch.tensor([vocab.ids_of(d) for d in dummy], device=device))
        swapped[:, k + 1] = rows[:, k + 1]
        got = [classify(im) for im in sample(model, vae, scale, swapped, uncond, args.guidance, 0)]
        swaps[attr] = sum(getattr(j, attr) == v for j, v in zip(got, new)) / n
    log(f"check: held-out colour {held[0]:.0%} shape {held[1]:.0%} background {held[2]:.0%}; "
        f"row swaps colour {swaps['colour']:.0%} shape {swaps['shape']:.0%}")
    return dict(held=held, swaps=swaps)


def train_ti(args, device, name, model, te, vae, scale, vocab) -> dict:
    """Textual inversion of one instance on its six reference pictures, by its own objective only:
    one token vector (CLIP's embedding width, written into both of SD3's CLIP encoders, which are the
    same encoder here) learned on `a <token>` and `a photo of a <token>` with the rectified-flow loss,
    the transformer and encoder frozen, as the UNet model's concepts are trained."""
    info, token = INSTANCES[name], f"<{name}>"
    with torch.no_grad():
        refs = vae.encode(render(references(name), device=device)).latent_dist.mean * scale
    vec = torch.nn.Parameter(te.get_input_embeddings().weight[vocab.ids[info["class_word"]]].detach().clone())
    opt = torch.optim.Adam([vec], lr=args.ti_lr)
    prompts = [["a", token], ["a", "photo", "of", "a", token]]
    b, t0 = args.concept_batch, time.time()
    for step in range(1, args.ti_steps + 1):
        rng = random.Random(args.seed * 31 + step)
        g = torch.Generator(device).manual_seed(args.seed * 31 + step)
        rows, poss = zip(*[concept_ids(vocab, rng.choice(prompts), token) for _ in range(b)])
        ids = torch.tensor(rows, device=device)
        mask = torch.zeros(ids.shape, dtype=torch.bool, device=device)
        mask[torch.arange(b), torch.tensor(poss)] = True
        cond = joint(encode(te, ids, vec.view(1, 1, -1).expand(b, MAX_LEN, -1), mask, penultimate=True).hidden)
        z0 = refs[torch.tensor([rng.randrange(len(refs)) for _ in range(b)], device=device)]
        loss = flow_loss(model, z0, cond, g)
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        progress(f"ti:{name}", step, args.ti_steps, t0, loss)
    return {"token": token, "vector": vec.detach().cpu().float()}


def export_concepts(args, concepts: dict) -> None:
    """Concept folders beside the UNet model's (`<name>-ti-mmdit`) with their reference pictures; the
    file holds the vector for each CLIP encoder."""
    for name, c in concepts.items():
        folder = args.out / "concepts" / f"{name}-ti-mmdit"
        folder.mkdir(parents=True, exist_ok=True)
        vector = c["vector"].view(1, -1).to(torch.float16)
        save_file({"clip_l": vector, "clip_g": vector.clone()}, folder / "learned_embeds.safetensors")
        (folder / "references").mkdir(exist_ok=True)
        refs = []
        for i, img in enumerate(to_uint8(render(references(name)))):
            Image.fromarray(img).save(folder / "references" / f"{i}.png")
            refs.append(f"references/{i}.png")
        manifest = dict(name=f"{name}-ti-mmdit", token=c["token"], class_word=INSTANCES[name]["class_word"],
                        kind="textual_inversion", weights="learned_embeds.safetensors", references=refs,
                        model=MODEL_NAME, example_prompt=INSTANCES[name]["example"])
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"exported {len(concepts)} concept(s)")


def export(args, model) -> None:
    """A StableDiffusion3Pipeline folder; the VAE's and tokenizer's files are links to the UNet model's
    (relative, so a clone keeps them); the encoder trained against is a copy in `text_encoder/`, which
    `text_encoder_2/` links to (SD3's two CLIP encoders are this one)."""
    out, src = args.out / MODEL_NAME, args.out / UNET_MODEL
    model.to(torch.float16).save_pretrained(out / "transformer")
    model.float()  # the shipped weights, rounded to fp16: what the concepts are trained against
    FlowMatchEulerDiscreteScheduler(shift=1.0).save_pretrained(out / "scheduler")
    vae_cfg = json.loads((src / "vae" / "config.json").read_text())
    vae_cfg["shift_factor"] = 0.0
    (out / "vae").mkdir(parents=True, exist_ok=True)
    (out / "vae" / "config.json").write_text(json.dumps(vae_cfg, indent=2) + "\n")
    _link(out / "vae" / "diffusion_pytorch_model.safetensors", src / "vae" / "diffusion_pytorch_model.safetensors")
    te_cfg = json.loads((src / "text_encoder" / "config.json").read_text())
    te_cfg.update(architectures=["CLIPTextModelWithProjection"], projection_dim=te_cfg["hidden_size"])
    width = te_cfg["hidden_size"]
    for name in ("text_encoder", "text_encoder_2"):
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(te_cfg, indent=2) + "\n")
        weights = folder / "model-00001-of-00002.safetensors"
        if name == "text_encoder":
            if weights.is_symlink():
                weights.unlink()
            shutil.copyfile(src / "text_encoder" / "model.safetensors", weights)
        else:
            _link(weights, out / "text_encoder" / "model-00001-of-00002.safetensors")
        save_file({"text_projection.weight": torch.zeros(width, width, dtype=torch.float16)},
                  folder / "model-00002-of-00002.safetensors")
        from safetensors import safe_open
        with safe_open(src / "text_encoder" / "model.safetensors", "pt") as f:
            keys = list(f.keys())
        index = {"metadata": {}, "weight_map": {**{k: "model-00001-of-00002.safetensors" for k in keys},
                                                "text_projection.weight": "model-00002-of-00002.safetensors"}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    for name in ("tokenizer", "tokenizer_2"):
        _link(out / name, src / "tokenizer")
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None], "image_encoder": [None, None],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "text_encoder_3": [None, None], "tokenizer_3": [None, None],
        "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}, indent=2) + "\n")
    log(f"exported to {out}")


def _link(path: Path, target: Path) -> None:
    if path.is_symlink() or path.exists():
        path.unlink()
    path.symlink_to(os.path.relpath(target, path.parent))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "assets", help="assets folder holding embedded-shapes")
    ap.add_argument("--work", type=Path, default=ROOT / ".train" / "mmdit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--swap-mix", type=float, default=0.25)
    ap.add_argument("--pattern-mix", type=float, default=0.2)
    ap.add_argument("--pure-mix", type=float, default=0.5)
    ap.add_argument("--eot-mix", type=float, default=1.0)
    ap.add_argument("--latent-pool", type=int, default=40, metavar="N")
    ap.add_argument("--guidance", type=float, default=EMBEDDED_MMDIT_DEFAULTS.guidance)
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--check-every", type=int, default=0, help="held-out and swap check every N steps (0: at the end)")
    ap.add_argument("--seconds", type=float, default=float("inf"), help="time cap of the training")
    ap.add_argument("--export-only", action="store_true", help="export the checkpoint's weights (EMA) as they are")
    ap.add_argument("--concepts", action="store_true",
                    help="then train textual-inversion concepts of the two instances (README: they do not reproduce "
                         "them yet, so none ship)")
    ap.add_argument("--concepts-only", action="store_true",
                    help="train the textual-inversion concepts on the exported model (--out) only")
    ap.add_argument("--ti-steps", type=int, default=1200)
    ap.add_argument("--ti-lr", type=float, default=5e-3)
    ap.add_argument("--concept-batch", type=int, default=16)
    ap.add_argument("--smoke", action="store_true", help="a few steps, tiny widths")
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps, args.batch, args.latent_pool, args.ti_steps, args.concept_batch = 3, 4, 0, 2, 2
    args.work.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    log(f"device {device}, torch {torch.__version__}")
    vocab = Vocab(CLIPTokenizer.from_pretrained(TOKENIZER_DIR, model_max_length=MAX_LEN))
    vae, _, te, scale = load_exported(args.out / UNET_MODEL, device)
    te.requires_grad_(False)
    if args.export_only:
        ck = load_ckpt(args.work, "mmdit")
        model = SD3Transformer2DModel(**transformer_config(args.smoke)).to(device)
        log(f"exporting step {ck['step']}")
        model = ema_copy(model, [e.to(device) for e in ck["ema"]])
        export(args, model.float())
        return
    if args.concepts_only:
        model = SD3Transformer2DModel.from_pretrained(args.out / MODEL_NAME / "transformer", dtype=torch.float32)
        model = model.to(device).eval().requires_grad_(False)
    else:
        pool = LatentPool(vae, device, args.latent_pool, args.seed, args.work) if args.latent_pool else None
        model = train(args, device, vae, scale, te, vocab, pool)
        check(args, device, vae, scale, te, vocab, model, n=8 if args.smoke else 128)
        export(args, model.float())
    if args.concepts or args.concepts_only:
        export_concepts(args, {name: train_ti(args, device, name, model, te, vae, scale, vocab) for name in INSTANCES})


if __name__ == "__main__":
    main()
