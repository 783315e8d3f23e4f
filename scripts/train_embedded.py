"""Train the embedded shapes-world model and its concepts, and write them under assets/.

    python scripts/train_embedded.py --out assets            # everything, resumable
    python scripts/train_embedded.py --smoke --out /tmp/x     # seconds-long check of every stage

Stages: `vae` (AutoencoderKL, scale factor 8), `unet` (UNet2DConditionModel + CLIPTextModel
trained jointly on captions), `concepts` (textual inversion and Custom Diffusion for each novel
instance), `export` (the diffusers folder and concept folders). Each stage checkpoints into
--work and resumes from there; batches are drawn from per-step seeds, so a resumed run on the CPU
draws the same data as an uninterrupted one. Uses CUDA when present. `--unet-init` continues an
exported UNet + text encoder, `--decoder-init` fine-tunes only an exported VAE's decoder (its
latent space stays), `--init-from` retrains only the concepts.

The world's captions name patterns (`a blue striped square`, `a green star with a hole`,
--pattern-mix of the scenes) on every shape and colour except the concepts' instances
(`shapes.NOVEL`): the instances are new combinations of things the model can draw, as a real
concept is for Stable Diffusion.

One choice in the data worth knowing: in a fraction of the UNet's batches (--swap-mix) one
attribute word's hidden-state row is taken from a dummy prompt (`* * square * * * *`) that names
another value, and the target image shows that other value. Large CLIP-conditioned models carry
a word's meaning in its own row; a 3-layer encoder trained from scratch on a handful of captions
has no reason to, because its causal attention copies every word into all later rows. The mix
teaches the small model what the large ones already do; it is part of training, not of AlignIT.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from alignit_core.encoding import encode, token_embeddings  # noqa: E402
from alignit_core.shapes import (COLOURS, HELD_OUT, NOVEL, PATTERN_PHRASES, SHAPES, TEMPLATES, Scene,  # noqa: E402
                                 classify, pattern_template, random_scene, render, styled, to_uint8)

TOKENIZER_DIR = ROOT / "assets" / "clip-tokenizer"
MODEL_NAME = "embedded-shapes"
MAX_LEN = 77
STAR = "*"

# The novel instances the base world never draws, and the concepts trained from them.
INSTANCES = {
    "striped-ball": dict(scene=styled(Scene("red", "circle", "blue"), pattern="striped"),  # white stripes
                         class_word="circle", example="a <striped-ball> on a green background"),
    "holed-star": dict(scene=Scene("orange", "star", "purple", pattern="holed"),
                       class_word="star", example="a <holed-star> on a white background"),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def progress(stage: str, step: int, total: int, t0: float, loss: torch.Tensor) -> None:
    if step % max(1, total // 20) == 0 or step == total:  # .item() syncs the GPU: only when printing
        rate = step / max(time.time() - t0, 1e-6)
        bar = "#" * int(20 * step / total)
        log(f"{stage} [{bar:<20}] {step}/{total} {rate:.1f} it/s loss {loss.item():.4f}")


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


def noise_schedule() -> dict:
    # Stable Diffusion's own schedule, so schedulers configured for SD behave the same here.
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)


class Vocab:
    """Word -> id for the world's captions (each word is one CLIP token; checked at start)."""

    def __init__(self, tokenizer: CLIPTokenizer):
        text = " ".join(TEMPLATES + tuple(PATTERN_PHRASES.values()))
        words = set(text.replace("{c}", "").replace("{s}", "").replace("{b}", "").split())
        words |= set(COLOURS) | set(SHAPES) | {STAR}
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

def sample_batch(rng: random.Random, vocab: Vocab, batch: int, swap_mix: float, pattern_mix: float = 0.0):
    """Captions (ids), dummy-prompt rows to mix in, and the scenes the targets show."""
    ids, dummy, swap_pos, targets = [], [], [], []
    for _ in range(batch):
        shown = random_scene(rng, patterned=pattern_mix)
        template = pattern_template(rng.choice(TEMPLATES), shown.pattern)
        words = template.split()
        dummy_words, pos = [], -1
        if rng.random() < 0.1:  # caption dropout for classifier-free guidance
            words = []
        elif rng.random() < swap_mix:
            key, attr = rng.choice([(k, a) for k, a in (("{c}", "colour"), ("{s}", "shape"),
                                                        ("{b}", "background")) if k in words])
            other = shown.background if attr == "colour" else shown.colour
            pool = SHAPES if attr == "shape" else [c for c in COLOURS if c != other]
            new = rng.choice([v for v in pool if v != getattr(shown, attr)])
            target = styled(shown, **{attr: new})
            if ((target.colour, target.shape, target.background) not in HELD_OUT
                    and (target.colour, target.shape, target.pattern) not in NOVEL):
                pos = words.index(key) + 1
                dummy_words = [STAR] * len(words)
                dummy_words[pos - 1] = new
        caption = " ".join(words).format(c=shown.colour, s=shown.shape, b=shown.background).split()
        ids.append(vocab.ids_of(caption))
        dummy.append(vocab.ids_of(dummy_words))
        swap_pos.append(pos)
        targets.append(target if pos > 0 else shown)
    return torch.tensor(ids), torch.tensor(dummy), torch.tensor(swap_pos), targets


def condition(te, ids, dummy, swap_pos):
    """Encode captions; where swap_pos >= 0 that row comes from the dummy prompt's encoding."""
    hidden = encode(te, ids).hidden
    mixed = swap_pos >= 0
    if mixed.any():
        d = encode(te, dummy[mixed]).hidden
        full = torch.zeros_like(hidden)
        full[mixed] = d
        rows = torch.zeros(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        idx = mixed.nonzero().squeeze(1)
        rows[idx, swap_pos[idx]] = True
        hidden = torch.where(rows.unsqueeze(-1), full, hidden)
    return hidden


def unet_lr(args, step: int, total: int) -> float:
    """Linear warm-up over 300 steps, then constant or (--cosine) down to a tenth at `total`."""
    lr = args.unet_lr * min(1.0, step / 300)
    if args.cosine:
        lr *= 0.1 + 0.45 * (1 + math.cos(math.pi * min(step / max(total, 1), 1.0)))
    return lr


def train_unet(args, device, vae, scale, te_cfg, unet_cfg, vocab, init=None):
    """Train the UNet and text encoder jointly, from scratch or (init) from an exported pair."""
    torch.manual_seed(args.seed)
    if init is None:
        te = CLIPTextModel(te_cfg).to(device)
        unet = UNet2DConditionModel(**unet_cfg).to(device)
    else:
        unet, te = (m.to(device).train().requires_grad_(True) for m in init)
    params = list(unet.parameters()) + list(te.parameters())
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
    t0, step = time.time(), start
    while step < total:
        step += 1
        if args.unet_fit_seconds and step == start + 5:
            t_fit = time.time()
        if args.unet_fit_seconds and step == start + 25:  # steps that fit the time given, fixed from here on
            rate = 20 / max(time.time() - t_fit, 1e-6)
            total = max(step, min(args.unet_steps, step + int(rate * (args.unet_fit_seconds - (time.time() - t0)))))
            log(f"unet: {rate:.1f} it/s, training to step {total} to fit {args.unet_fit_seconds:.0f} s")
        rng = random.Random(args.seed * 104729 + step)
        ids, dummy, swap_pos, scenes = sample_batch(rng, vocab, args.unet_batch, args.swap_mix, args.pattern_mix)
        ids, dummy, swap_pos = ids.to(device), dummy.to(device), swap_pos.to(device)
        g = torch.Generator(device).manual_seed(args.seed * 104729 + step)
        with torch.no_grad():
            post = vae.encode(render(scenes, device=device)).latent_dist
            z0 = (post.mean + post.std * torch.randn(post.mean.shape, generator=g, device=device)) * scale
        t = torch.randint(0, 1000, (z0.shape[0],), generator=g, device=device)
        eps = torch.randn(z0.shape, generator=g, device=device)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        lr = unet_lr(args, step, total)
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            cond = condition(te, ids, dummy, swap_pos)
            pred = unet(zt, t, encoder_hidden_states=cond).sample.float()
        loss = F.mse_loss(pred, eps)
        opt.zero_grad(set_to_none=True); loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        progress("unet", step, total, t0, loss)
        over = time.time() - t0 > args.unet_seconds
        if step % args.ckpt_every == 0 or step == total or over:
            save_ckpt(args.work, "unet", dict(unet=unet.state_dict(), te=te.state_dict(), opt=opt.state_dict(),
                                              ema=[e.cpu() for e in ema], step=step, total=total))
            if over:
                log(f"unet: stopped at step {step} by its time cap"); break
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    return unet.eval().requires_grad_(False), te.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------- concepts

def references(name: str, n: int = 6) -> list[Scene]:
    rng = random.Random(sum(map(ord, name)))
    base = INSTANCES[name]["scene"]
    return [replace(base, cx=rng.uniform(-0.1, 0.1), cy=rng.uniform(-0.1, 0.1), radius=rng.uniform(0.5, 0.6))
            for _ in range(n)]


def _diffusion_loss(unet, z0, alphas, cond, g, device):
    t = torch.randint(0, 1000, (z0.shape[0],), generator=g, device=device)
    eps = torch.randn(z0.shape, generator=g, device=device)
    a = alphas[t].view(-1, 1, 1, 1)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        pred = unet(a.sqrt() * z0 + (1 - a).sqrt() * eps, t, encoder_hidden_states=cond).sample.float()
    return F.mse_loss(pred, eps)


def concept_ids(vocab: Vocab, words: list[str], token: str):
    """ids with the concept token's position marked (its id is a placeholder, its vector learned)."""
    pos = words.index(token) + 1
    ids = vocab.ids_of([STAR if w == token else w for w in words])
    return ids, pos


def train_concept(args, device, name, kind, unet, te, vae, scale, vocab):
    """Textual inversion (`ti`) learns one vector; Custom Diffusion (`cd`) learns one vector plus
    every cross-attention layer's to_k/to_v, with prior preservation on captioned base-world images."""
    info, token = INSTANCES[name], f"<{name}>"
    with torch.no_grad():
        refs = vae.encode(render(references(name), device=device)).latent_dist.mean * scale  # (n, 4, 16, 16)
    emb = token_embeddings(te).weight
    init = emb[vocab.ids[info["class_word"]] if kind == "ti" else vocab.ids[STAR]].detach().clone()
    vec = torch.nn.Parameter(init.clone())
    groups = [dict(params=[vec], lr=5e-3)]
    cd_unet = None
    if kind == "cd":
        cd_unet = copy.deepcopy(unet)
        kv = [p for n, p in cd_unet.named_parameters() if "attn2.to_k" in n or "attn2.to_v" in n]
        for p in kv:
            p.requires_grad_(True)
        groups.append(dict(params=kv, lr=2e-4))
    opt = torch.optim.Adam(groups)
    sched = DDPMScheduler(**{k: v for k, v in noise_schedule().items() if k != "set_alpha_to_one"})
    alphas = sched.alphas_cumprod.to(device)
    model = cd_unet or unet
    phrase = [token, info["class_word"]] if kind == "cd" else [token]
    prompts = [["a"] + phrase, ["a", "photo", "of", "a"] + phrase]
    t0, total = time.time(), args.concept_steps
    for step in range(1, total + 1):
        rng = random.Random(args.seed * 31 + step)
        g = torch.Generator(device).manual_seed(args.seed * 31 + step)
        b = args.concept_batch
        rows, poss = zip(*[concept_ids(vocab, rng.choice(prompts), token) for _ in range(b)])
        ids = torch.tensor(rows, device=device)
        mask = torch.zeros(ids.shape, dtype=torch.bool, device=device)
        mask[torch.arange(b), torch.tensor(poss)] = True
        vectors = vec.view(1, 1, -1).expand(b, MAX_LEN, -1)
        z0 = refs[torch.tensor([rng.randrange(len(refs)) for _ in range(b)], device=device)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            cond = encode(te, ids, vectors, mask).hidden
        loss = _diffusion_loss(model, z0, alphas, cond, g, device)
        if kind == "cd":  # prior preservation: the class as the base world draws it
            p_ids, p_dummy, p_pos, p_scenes = sample_batch(rng, vocab, b, 0.0, args.pattern_mix)
            with torch.no_grad():
                p_cond = encode(te, p_ids.to(device)).hidden
                p_z0 = vae.encode(render(p_scenes, device=device)).latent_dist.mean * scale
            loss = loss + _diffusion_loss(model, p_z0, alphas, p_cond, g, device)
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        progress(f"{kind}:{name}", step, total, t0, loss)
        if time.time() - t0 > args.concept_seconds:
            log(f"{kind}:{name}: stopped at step {step} by its time cap"); break
    out = {"token": token, "vector": vec.detach().cpu().float()}
    if kind == "cd":
        out["kv"] = {n: p.detach().cpu().float() for n, p in cd_unet.named_parameters()
                     if "attn2.to_k" in n or "attn2.to_v" in n}
    return out


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
        for i, img in enumerate(to_uint8(render(references(name)))):
            from PIL import Image
            Image.fromarray(img).save(folder / "references" / f"{i}.png")
            refs.append(f"references/{i}.png")
        save_file({c["token"]: c["vector"].view(1, -1).to(torch.float16)}, folder / "learned_embeds.safetensors")
        manifest = dict(name=f"{name}-{kind}", token=c["token"], class_word=INSTANCES[name]["class_word"],
                        kind="textual_inversion" if kind == "ti" else "custom_diffusion",
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
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"exported to {args.out}")


@torch.no_grad()
def sample(vae, unet, te, scale, cond: torch.Tensor, guidance: float, seed: int, steps: int = 20):
    """A plain DDIM loop with classifier-free guidance from conditioning rows (n, 77, dim) to
    uint8 images (n, H, W, 3); the unconditional rows are the empty prompt's."""
    n, device = cond.shape[0], cond.device
    sched = DDIMScheduler(**noise_schedule())
    sched.set_timesteps(steps)
    c = te.config
    empty = [c.bos_token_id, c.eos_token_id] + [c.pad_token_id] * (MAX_LEN - 2)  # Vocab.ids_of([])
    uncond = encode(te, torch.tensor([empty] * n, device=device)).hidden
    z = torch.randn((n, 4, 16, 16), generator=torch.Generator(device).manual_seed(seed), device=device)
    for t in sched.timesteps:
        eu, ec = unet(torch.cat([z, z]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
        z = sched.step(eu + guidance * (ec - eu), t, z).prev_sample
    return to_uint8(vae.decode(z / scale).sample.float())


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
    from alignit_core.evaluate import fidelity
    scenes = [styled(Scene(c, s, b), pattern=p) for c, s, b, p in
              [("red", "circle", "green", "striped"), ("orange", "star", "white", "holed"),
               ("blue", "square", "yellow", "striped"), ("green", "triangle", "black", "holed")]]
    scenes = [scenes[i % len(scenes)] for i in range(n)]
    ids = torch.tensor([vocab.ids_of(sc.caption().split()) for sc in scenes], device=device)
    images = sample(vae, unet, te, scale, encode(te, ids).hidden, args.guidance, 1)
    for k in range(4):
        got = [fidelity(classify(im), sc) for im, sc in zip(images[k::4], scenes[k::4])]
        log(f"pattern check: {scenes[k].caption()!r} {sum(got)}/{len(got)}")


def load_exported(folder: Path, device):
    """(vae, unet, text encoder, latent scale) of an exported model folder, fp32, in eval mode."""
    vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32).to(device)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32).to(device)
    te = CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=torch.float32).to(device)
    vae.eval().requires_grad_(False)
    return vae, unet.eval(), te.eval(), vae.config.scaling_factor


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
    ap.add_argument("--concept-steps", type=int, default=400)
    ap.add_argument("--concept-batch", type=int, default=16)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--ckpt-every", type=int, default=500)
    ap.add_argument("--vae-seconds", type=float, default=float("inf"), help="time cap of the VAE stage")
    ap.add_argument("--unet-seconds", type=float, default=float("inf"), help="time cap of the UNet stage")
    ap.add_argument("--concept-seconds", type=float, default=float("inf"), help="time cap per concept")
    ap.add_argument("--cosine", action="store_true", help="UNet learning rate decays (cosine) to a tenth")
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
        args.concept_steps, args.concept_batch = 2, 2
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
    if args.init_from:  # continue from an exported model: concepts only
        vae, unet, te, scale = load_exported(args.init_from, device)
        unet.requires_grad_(False)
        te.requires_grad_(False)
    elif args.unet_init:  # continue an exported model's UNet + text encoder on its own VAE
        vae, unet, te, scale = load_exported(args.unet_init, device)
        unet, te = train_unet(args, device, vae, scale, te_cfg, unet_cfg, vocab, (unet, te))
    else:
        vae = train_vae(args, device, vae_cfg)
        scale = latent_scale(vae, device, args.seed)
        log(f"latent scale {scale:.4f}")
        unet, te = train_unet(args, device, vae, scale, te_cfg, unet_cfg, vocab)
    if not args.init_from:  # a concepts-only run leaves the model as it is
        quick_check(args, device, vae, unet, te, scale, vocab, n=8 if args.smoke else 128)
        pattern_check(args, device, vae, unet, te, scale, vocab, n=8 if args.smoke else 64)
    concepts = {}
    for name in INSTANCES:
        for kind in ("ti", "cd"):
            if args.concepts is None or f"{name}-{kind}" in args.concepts:
                concepts[(name, kind)] = train_concept(args, device, name, kind, unet, te, vae, scale, vocab)
    export(args, vae.float(), unet.float(), te.float(), scale, concepts)


if __name__ == "__main__":
    main()
