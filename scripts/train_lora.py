"""DreamBooth-LoRA on the embedded model for one of its novel instances, with the standard objective
of diffusers' DreamBooth-LoRA training: a LoRA (peft) on the UNet's attention projections (with
--text-encoder, on the text encoder's too), the noise-prediction loss on the instance's reference
images captioned `a <token> <class word>`, plus the prior-preservation loss on the base model's own
samples of `a <class word>`.

    python scripts/train_lora.py --instance striped-ball --out out/lora/striped-ball
    python scripts/train_lora.py --instance holed-star --token ohwx --out out/lora/holed-star
    python -m alignit_core generate --model embedded --concept out/lora/striped-ball \\
        --prompt "a sks on a green background" --out out/striped-ball

Writes `pytorch_lora_weights.safetensors` (diffusers' names, as its scripts save it), the reference
images and `manifest.json` (kind lora, trigger word, class word, the instance) into --out; the
class images are the base model's final latents for `a <class word>`, one seed each. Uses CUDA when
present. The reference images are the ones the shipped concepts of the instance learned from.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from alignit_core import Settings, load_model, tokenize
from alignit_core.conditioning import Row
from alignit_core.generate import run_rows
from alignit_core.settings import resolve
from alignit_core.models import EMBEDDED
from alignit_core.toy.instances import INSTANCES, references
from alignit_core.toy.shapes import render, to_uint8

ROOT = Path(__file__).resolve().parents[1]

UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # diffusers' DreamBooth-LoRA scripts' choice
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def class_latents(model, class_word: str, n: int, steps: int) -> torch.Tensor:
    """(n, 4, h, w): the base model's samples of `a <class word>` (prior preservation), seeds 0..n-1."""
    out = []
    for seed in range(n):
        settings = resolve(model, Settings(seed=seed, steps=steps, record_maps=False))
        out.append(run_rows(model, [Row("class", tokenize(model.tokenizer, f"a {class_word}"))], settings)[3][0])
    return torch.stack(out)


def train(args) -> Path:
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    info = INSTANCES[args.instance]
    class_word = info["class_word"]
    model = load_model("embedded", device=str(device), dtype=torch.float32)  # only draws the class images
    prior = class_latents(model, class_word, args.class_images, args.class_steps)
    pipe = StableDiffusionPipeline.from_pretrained(EMBEDDED, dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.to(device)
    unet, te, vae = pipe.unet, pipe.text_encoder, pipe.vae
    for module in (unet, te, vae):
        module.requires_grad_(False)
    scenes = references(args.instance)
    with torch.no_grad():
        instance = vae.encode(render(scenes, device=device)).latent_dist.mean * vae.config.scaling_factor
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                target_modules=UNET_TARGETS))
    if args.text_encoder:
        te.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                  target_modules=TEXT_TARGETS))
    params = [p for m in (unet, te) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    noise = DDPMScheduler.from_config(pipe.scheduler.config)
    ids = pipe.tokenizer([f"a {args.token} {class_word}", f"a {class_word}"], padding="max_length",
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids.to(device)
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        pick = torch.randint(0, len(instance), (args.batch,), generator=g)
        pick_prior = torch.randint(0, len(prior), (args.batch,), generator=g)
        z0 = torch.cat([instance[pick.to(device)], prior[pick_prior].to(device)])
        eps = torch.randn(z0.shape, generator=g).to(device)
        t = torch.randint(0, noise.config.num_train_timesteps, (2 * args.batch,), generator=g).to(device)
        cond = te(ids)[0].repeat_interleave(args.batch, dim=0)  # (2b, tokens, dim): instance rows, then prior rows
        pred = unet(noise.add_noise(z0, eps, t), t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred[: args.batch], eps[: args.batch]) + \
            args.prior_weight * F.mse_loss(pred[args.batch:], eps[args.batch:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, args.steps // 10) == 0 or step == args.steps:
            print(f"step {step}/{args.steps}  loss {loss.item():.4f}  {time.time() - t0:.0f}s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    layers = {"unet_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
              "unet_lora_adapter_metadata": unet.peft_config["default"].to_dict()}
    if args.text_encoder:
        layers.update(text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(te)),
                      text_encoder_lora_adapter_metadata=te.peft_config["default"].to_dict())
    StableDiffusionPipeline.save_lora_weights(out, **layers)
    (out / "references").mkdir(exist_ok=True)
    refs = []
    for i, image in enumerate(to_uint8(render(scenes))):
        Image.fromarray(image).save(out / "references" / f"{i}.png")
        refs.append(f"references/{i}.png")
    (out / "manifest.json").write_text(json.dumps({
        "name": out.name, "kind": "lora", "lora": "pytorch_lora_weights.safetensors", "token": args.token,
        "class_word": class_word, "instance": args.instance, "model": EMBEDDED.name, "references": refs,
        "example_prompt": f"a {args.token} on a green background",
        "training": {"steps": args.steps, "rank": args.rank, "lr": args.lr, "batch": args.batch,
                     "class_images": args.class_images, "prior_weight": args.prior_weight,
                     "text_encoder": args.text_encoder, "seed": args.seed}}, indent=2) + "\n")
    return out


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instance", choices=sorted(INSTANCES), required=True)
    ap.add_argument("--token", default="sks", help="the trigger word (a rare word of the tokenizer)")
    ap.add_argument("--out", required=True, help="the concept folder to write (not under assets/)")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4, help="instance images per step (as many prior images join)")
    ap.add_argument("--class-images", type=int, default=32)
    ap.add_argument("--class-steps", type=int, default=20, help="denoising steps of each class image")
    ap.add_argument("--prior-weight", type=float, default=1.0)
    ap.add_argument("--text-encoder", action="store_true", help="train a LoRA on the text encoder too")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device")
    args = ap.parse_args(argv)
    if (ROOT / "assets").resolve() in Path(args.out).resolve().parents:
        ap.error("--out must not be under assets/")
    return train(args)


if __name__ == "__main__":
    main()
