"""DreamBooth-LoRA concepts: files that peft made and diffusers (or a kohya-named writer) saved,
read back; the customized baseline against diffusers' own `load_lora_weights`; AlignIT's rows from
the LoRA-adapted projections; files that are bad, for another model or unsafe; no LoRA ever reaching
the shared model or another request."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from conftest import run_at_once
from safetensors.torch import save_file

import app
from alignit_core import ConceptError, Settings, generate_concept, generate_swap, load_concept
from alignit_core.conditioning import encode_prompt
from alignit_core.prompts import tokenize
from alignit_core.testing import build_tiny_sd, build_tiny_sdxl

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "proj_in", "conv1"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
FAST = Settings(seed=4, steps=4, guidance=6.0)


def peft_lora(pipe, seed: int = 0, unet_targets=UNET_TARGETS, text: bool = True, rank: int = 4, alpha: int = 8):
    """Add a randomly initialised peft LoRA (clear updates, not the zero start of training) to
    `pipe`'s UNet and text encoder(s); returns {part: peft state dict} and the adapter configs."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    parts = {"unet": (pipe.unet, unet_targets)}
    if text:
        parts["text_encoder"] = (pipe.text_encoder, TEXT_TARGETS)
        if getattr(pipe, "text_encoder_2", None) is not None:
            parts["text_encoder_2"] = (pipe.text_encoder_2, TEXT_TARGETS)
    states, configs = {}, {}
    for name, (module, targets) in parts.items():
        module.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False, target_modules=targets))
        with torch.no_grad():
            for n, p in module.named_parameters():
                if "lora_B" in n:
                    p.mul_(4.0)  # updates large enough to change the picture clearly
        states[name] = get_peft_model_state_dict(module)
        configs[name] = module.peft_config["default"].to_dict()
    return states, configs


def save_diffusers(pipe_cls, states, configs, folder: Path, naming: str = "diffusers") -> Path:
    """Saved by diffusers as its DreamBooth-LoRA scripts do (`naming='diffusers'`: their
    convert_state_dict_to_diffusers names) or with peft's own names (`naming='peft'`)."""
    from diffusers.utils import convert_state_dict_to_diffusers

    convert = convert_state_dict_to_diffusers if naming == "diffusers" else dict
    kw = {f"{part}_lora_layers": convert(state) for part, state in states.items()}
    kw.update({f"{part}_lora_adapter_metadata": config for part, config in configs.items()})
    pipe_cls.save_lora_weights(folder, **kw)
    return folder / "pytorch_lora_weights.safetensors"


def _ldm_block(module: str, unet) -> str:
    """A diffusers UNet layer in the original SDXL model's block names (what kohya's SDXL files use)."""
    per = unet.config.layers_per_block
    parts = module.split(".")
    if parts[0] == "down_blocks":
        index = int(parts[1]) * (per + 1) + int(parts[3]) + 1
        return f"input_blocks_{index}_1_" + "_".join(parts[4:])
    if parts[0] == "up_blocks":
        index = int(parts[1]) * (per + 1) + int(parts[3])
        return f"output_blocks_{index}_1_" + "_".join(parts[4:])
    return "middle_block_1_" + "_".join(parts[3:])


def save_kohya(states, configs, path: Path, unet=None, metadata: dict | None = None) -> Path:
    """The same LoRA in kohya/A1111 names: `lora_unet_...`/`lora_te_...` (SDXL: `lora_te1_`, `lora_te2_`,
    the UNet in the original block names when `unet` is given), `lora_down`/`lora_up`/`alpha`."""
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_" if "text_encoder_2" not in states else "lora_te1_",
                "text_encoder_2": "lora_te2_"}
    out = {}
    for part, state in states.items():
        alpha = torch.tensor(float(configs[part]["lora_alpha"]))
        for key, value in state.items():
            module, _, which = key.rpartition(".lora_")
            if part == "unet":
                name = _ldm_block(module, unet) if unet is not None else module.replace(".", "_")
            else:
                name = "text_model_" + module.removeprefix("text_model.").replace(".", "_")
            stem = prefixes[part] + name
            out[f"{stem}.lora_{'down' if which.startswith('A') else 'up'}.weight"] = value.contiguous()
            out[f"{stem}.alpha"] = alpha.clone()
    save_file(out, str(path), metadata=metadata)
    return path


def _reference(pipe_cls_builder, lora_path: Path, prompt: str, scale: float, size=64) -> np.ndarray:
    """What diffusers draws with the file: `load_lora_weights` and `set_adapters` at `scale`."""
    pipe = pipe_cls_builder()
    pipe.load_lora_weights(str(lora_path.parent), weight_name=lora_path.name, adapter_name="concept")
    pipe.set_adapters(["concept"], [scale])
    latent = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(FAST.seed))
    return pipe(prompt, num_inference_steps=FAST.steps, guidance_scale=FAST.guidance, height=size, width=size,
                latents=latent, output_type="np").images[0]


def _plain(pipe_cls_builder, prompt: str, size=64) -> np.ndarray:
    latent = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(FAST.seed))
    return pipe_cls_builder()(prompt, num_inference_steps=FAST.steps, guidance_scale=FAST.guidance, height=size,
                              width=size, latents=latent, output_type="np").images[0]


@pytest.fixture(scope="module")
def sd_lora(tmp_path_factory):
    """peft LoRAs for the tiny SD, with text-encoder updates: what diffusers' DreamBooth-LoRA script
    trains and saves (attention only, its own names), and one over attention, feed-forward, 1x1 and
    3x3 convolutions, saved with peft's names and with kohya's. (diffusers 0.42 itself drops the
    attention updates of a file in its own names that also holds convolution updates, so that
    combination is not compared with it.)"""
    from diffusers import StableDiffusionPipeline

    root = tmp_path_factory.mktemp("sd-lora")
    files = {"diffusers": save_diffusers(StableDiffusionPipeline, *peft_lora(build_tiny_sd(), unet_targets=UNET_TARGETS[:4]),
                                         root / "diffusers", "diffusers")}
    states, configs = peft_lora(build_tiny_sd())
    files["peft"] = save_diffusers(StableDiffusionPipeline, states, configs, root / "peft", "peft")
    (root / "kohya").mkdir()
    files["kohya"] = save_kohya(states, configs, root / "kohya" / "sks.safetensors",
                                metadata={"ss_tag_frequency": json.dumps({"10_sks dog": {"sks dog": 20}}),
                                          "ss_network_dim": "4", "ss_network_alpha": "8"})
    return files


@pytest.mark.parametrize("naming", ["diffusers", "peft", "kohya"])
def test_lora_customized_baseline_is_what_diffusers_draws(naming, sd_lora, tiny_sd):
    concept = load_concept(sd_lora[naming], tiny_sd, token="sks", class_word="dog", lora_scale=0.7)
    assert concept.kind == "lora" and concept.phrase == "{token} {class_word}"
    gen = generate_concept(tiny_sd, "a photo of a sks", concept, FAST)
    assert gen.record()["customized_prompt"] == "a photo of a sks dog" and gen.record()["p"] == "a photo of a dog"
    ref = _reference(build_tiny_sd, sd_lora[naming], "a photo of a sks dog", 0.7)
    ours = np.asarray(gen.images["customized"], dtype=np.float64) / 255
    assert np.abs(ref - _plain(build_tiny_sd, "a photo of a sks dog")).mean() > 8 / 255  # the LoRA shows
    assert np.abs(ours - ref).max() < 2 / 255, f"{np.abs(ours - ref).max() * 255:.1f}/255"


@pytest.mark.parametrize("naming", ["peft", "kohya"])
def test_sdxl_lora_customized_baseline_is_what_diffusers_draws(naming, tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    states, configs = peft_lora(build_tiny_sdxl(), seed=1, unet_targets=["to_q", "to_k", "to_v", "to_out.0"])
    if naming == "peft":
        path = save_diffusers(StableDiffusionXLPipeline, states, configs, tmp_path, "peft")
    else:
        path = save_kohya(states, configs, tmp_path / "sks.safetensors", unet=build_tiny_sdxl().unet)
    concept = load_concept(path, tiny_sdxl, token="sks", class_word="dog")
    gen = generate_concept(tiny_sdxl, "a photo of a sks", concept, FAST)
    ref = _reference(build_tiny_sdxl, path, "a photo of a sks dog", 1.0)
    ours = np.asarray(gen.images["customized"], dtype=np.float64) / 255
    assert np.abs(ref - _plain(build_tiny_sdxl, "a photo of a sks dog")).mean() > 4 / 255
    assert np.abs(ours - ref).max() < 2 / 255, f"{np.abs(ours - ref).max() * 255:.1f}/255"


def test_an_sdxl_lora_with_text_encoders_used_after_the_first_request_leaves_later_requests_as_they_were(tmp_path):
    """The LoRA's views of both encoders are made after the model's first request (on SD3 such a view once
    left the encoder hooked twice, and every later request read the wrong hidden state): the requests after
    it draw what the ones before it drew."""
    from diffusers import StableDiffusionXLPipeline
    from alignit_core.models import from_components

    model = from_components(build_tiny_sdxl(), "tiny-sdxl")
    before = generate_swap(model, "a photo of a dog", [("dog", "cat")], FAST)  # the encoders' first call
    states, configs = peft_lora(build_tiny_sdxl(), seed=2, unet_targets=["to_q", "to_k"])
    concept = load_concept(save_diffusers(StableDiffusionXLPipeline, states, configs, tmp_path), model,
                           token="sks", class_word="dog")
    assert len(concept.text_encoders) == 2
    generate_concept(model, "a photo of a sks", concept, FAST)
    after = generate_swap(model, "a photo of a dog", [("dog", "cat")], FAST)
    for row in before.images:
        assert np.array_equal(np.asarray(before.images[row]), np.asarray(after.images[row])), row


def test_the_trigger_and_class_word_come_from_kohya_metadata_or_must_be_given(sd_lora, tiny_sd, tmp_path):
    c = load_concept(sd_lora["kohya"], tiny_sd)
    assert (c.token, c.class_word, c.name) == ("sks", "dog", "sks")
    with pytest.raises(ConceptError, match="does not say its trigger word and class word"):
        load_concept(sd_lora["peft"], tiny_sd)
    folder = tmp_path / "dog"
    folder.mkdir()
    (folder / "lora.safetensors").write_bytes(sd_lora["peft"].read_bytes())
    (folder / "manifest.json").write_text(json.dumps({"kind": "lora", "lora": "lora.safetensors", "token": "sks",
                                                      "class_word": "dog", "scale": 0.5}))
    from_manifest = load_concept(folder, tiny_sd)
    layer, edit = next(iter(from_manifest.unet.items()))
    assert (from_manifest.token, from_manifest.class_word) == ("sks", "dog")
    assert edit.scale == pytest.approx(0.5 * 8 / 4)  # the manifest's scale times alpha / rank


def test_alignit_on_a_lora_takes_the_concepts_rows_from_the_lora_model_and_the_rest_from_the_base(sd_lora, tiny_sd):
    """The concept's rows: the LoRA-adapted to_k/to_v of the LoRA text encoder's encoding of p';
    every other row: the base model's projection of p."""
    concept = load_concept(sd_lora["peft"], tiny_sd, token="sks", class_word="dog")
    seen = {}

    def on_kv(layer, step, key, value):
        seen[(layer, step)] = (key.clone(), value.clone())

    gen = generate_concept(tiny_sd, "a photo of a sks", concept, Settings(steps=1), on_kv=on_kv)
    p_dummy, positions = gen.record()["p_dummy"], gen.record()["positions"]
    assert p_dummy == "* * * sks dog" and positions == [5]
    enc_p, _ = encode_prompt(tiny_sd, tokenize(tiny_sd.tokenizer, "a photo of a dog"), None)
    enc_dummy, _ = encode_prompt(tiny_sd, tokenize(tiny_sd.tokenizer, p_dummy), concept)
    enc_dummy_base, _ = encode_prompt(tiny_sd, tokenize(tiny_sd.tokenizer, p_dummy), None)
    assert (enc_dummy - enc_dummy_base).abs().max() > 1e-3  # the text encoder's LoRA acts on p'
    others = [i for i in range(77) if i != 5]
    for layer, attn in tiny_sd.cross_attention_layers.items():
        key, value = seen[(layer, 0)]  # batch: [uncond customized, uncond alignit, cond customized, cond alignit]
        for got, base, name in ((key, attn.to_k, "to_k"), (value, attn.to_v, "to_v")):
            lora = concept.unet[f"{layer}.{name}"]
            adapted = base(enc_dummy) + lora.scale * (enc_dummy @ lora.down.T) @ lora.up.T
            torch.testing.assert_close(got[3, 5], adapted[5], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(got[3, others], base(enc_p)[others], rtol=1e-4, atol=1e-5)


def test_the_rest_of_the_lora_is_off_by_default_and_raises_only_what_is_beyond_the_keys_and_values(tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline

    def alignit(path, rest):
        concept = load_concept(path, tiny_sd, token="sks", class_word="dog")
        gen = generate_concept(tiny_sd, "a photo of a sks", concept, Settings(steps=3, lora_rest=rest))
        return gen.latents["alignit"], gen

    only_kv = save_diffusers(StableDiffusionPipeline, *peft_lora(build_tiny_sd(), unet_targets=["attn2.to_k",
                                                                                                  "attn2.to_v"]),
                             tmp_path / "kv")
    assert torch.equal(alignit(only_kv, 0.0)[0], alignit(only_kv, 1.0)[0])  # nothing beyond the keys and values
    full = save_diffusers(StableDiffusionPipeline, *peft_lora(build_tiny_sd()), tmp_path / "full")
    off, gen = alignit(full, 0.0)
    assert gen.record()["lora_rest"] == 0.0
    half, one = alignit(full, 0.5)[0], alignit(full, 1.0)[0]
    assert not torch.equal(off, half) and not torch.equal(half, one)


def test_a_request_with_a_lora_and_one_without_run_at_once_without_leaking(sd_lora, tiny_sd):
    concept = load_concept(sd_lora["diffusers"], tiny_sd, token="sks", class_word="dog")
    before = {k: v.clone() for k, v in tiny_sd.unet.state_dict().items()}
    jobs = [lambda: generate_concept(tiny_sd, "a photo of a sks", concept, Settings(seed=1, steps=3, lora_rest=1.0)),
            lambda: generate_swap(tiny_sd, "a photo of a dog", [("dog", "cat")], Settings(seed=1, steps=3))]
    alone = [job() for job in jobs]
    together = run_at_once(jobs)
    for a, b in zip(alone, together):
        for row in a.images:
            assert np.array_equal(np.asarray(a.images[row]), np.asarray(b.images[row])), row
    after = tiny_sd.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not any("lora" in name for name, _ in tiny_sd.unet.named_modules())
    plain = generate_swap(tiny_sd, "a photo of a dog", [("dog", "cat")], Settings(seed=1, steps=3))
    assert np.array_equal(np.asarray(plain.images["baseline"]), np.asarray(alone[1].images["baseline"]))


# ------------------------------------------------------------------------------ bad files


def _lora_file(tmp_path, tensors, name="lora.safetensors", metadata=None) -> Path:
    path = tmp_path / name
    save_file(tensors, str(path), metadata=metadata)
    return path


LAYER = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


def _pair(rank=4, width_in=32, width_out=16, **extra):
    return {f"{LAYER}.lora_down.weight": torch.ones(rank, width_in) * 0.01,
            f"{LAYER}.lora_up.weight": torch.ones(width_out, rank) * 0.01, **extra}


BAD_FILES = {
    "made for SD 1.5 (768-wide text)": (_pair(width_in=768), r"are \(4, 768\) and \(16, 4\); tiny-sd's layer is "
                                                             r"\(16, 32\): the LoRA is for another model"),
    "made for SDXL's blocks": ({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight":
                                torch.zeros(4, 32), "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k."
                                "lora_up.weight": torch.zeros(16, 4)}, "does not exist in tiny-sd"),
    "a second text encoder": ({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight":
                               torch.zeros(4, 32), "lora_te2_text_model_encoder_layers_0_self_attn_q_proj."
                               "lora_up.weight": torch.zeros(32, 4), **_pair()}, "second text encoder"),
    "LyCORIS keys": (_pair(**{f"{LAYER}.hada_w1_a": torch.zeros(4, 4)}), "keys this reader does not know"),
    "down without up": ({f"{LAYER}.lora_down.weight": torch.zeros(4, 32)}, "but no up weight"),
    "integers": ({f"{LAYER}.lora_down.weight": torch.zeros(4, 32, dtype=torch.int32),
                  f"{LAYER}.lora_up.weight": torch.zeros(16, 4)}, "not floating point"),
    "NaN": (_pair(**{f"{LAYER}.lora_up.weight": torch.full((16, 4), math.nan)}), "not finite"),
    "ranks that disagree": ({f"{LAYER}.lora_down.weight": torch.zeros(4, 32),
                             f"{LAYER}.lora_up.weight": torch.zeros(16, 8)}, "the LoRA is for another model"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_lora_upload_is_refused_clearly_before_its_tensors_are_read(case, tiny_sd, tmp_path, monkeypatch):
    import alignit_core.lora as lora_module

    tensors, words = BAD_FILES[case]
    path = _lora_file(tmp_path, tensors)
    real, read = lora_module.safe_open, []

    class Watched:
        def __init__(self, *a, **k):
            self.f = real(*a, **k)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *a):
            return self.f.__exit__(*a)

        def __getattr__(self, name):
            if name == "get_tensor":
                read.append(name)
            return getattr(self.f, name)

    monkeypatch.setattr(lora_module, "safe_open", Watched)
    with pytest.raises(gr.Error) as e:
        app.add_concept(tiny_sd, {}, {}, str(path), "sks", "dog")
    assert e.value.title == "Concept error"
    assert re.search(words, e.value.message), e.value.message
    # the header says all but a value: NaN is found in the tensors, read after the header passed
    assert bool(read) == (case == "NaN"), "tensors were read before the header was checked"


def test_a_lora_is_read_from_safetensors_only_and_within_the_size_cap(sd_lora, tiny_sd, tmp_path, monkeypatch):
    folder = tmp_path / "pickled"
    folder.mkdir()
    torch.save({f"{LAYER}.lora_down.weight": torch.zeros(4, 32)}, folder / "lora.bin")
    (folder / "manifest.json").write_text(json.dumps({"kind": "lora", "lora": "lora.bin", "token": "sks",
                                                      "class_word": "dog"}))
    with pytest.raises(ConceptError, match="read from .safetensors only"):
        load_concept(folder, tiny_sd)
    monkeypatch.setattr(app, "MAX_UPLOAD_BYTES", 1024)
    with pytest.raises(gr.Error, match="the limit is"):
        app.add_concept(tiny_sd, {}, {}, str(sd_lora["kohya"]), "", "")


def test_a_dora_adapter_is_refused(tiny_sd, tmp_path):
    meta = {"lora_adapter_metadata": json.dumps({"unet.use_dora": True, "unet.lora_alpha": 4, "unet.r": 4})}
    tensors = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": torch.zeros(4, 32),
               "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": torch.zeros(16, 4)}
    with pytest.raises(ConceptError, match="DoRA"):
        load_concept(_lora_file(tmp_path, tensors, metadata=meta), tiny_sd, token="sks", class_word="dog")


def test_an_uploaded_lora_joins_the_session(sd_lora, tiny_sd):
    uploaded, choices, second, prompt = app.add_concept(tiny_sd, {}, {}, str(sd_lora["kohya"]), "", "")
    concept = uploaded["uploaded:sks"]
    assert concept.kind == "lora" and prompt == "a photo of a sks"
    assert any("DreamBooth-LoRA" in label for label, _ in choices["choices"])


def test_the_command_line_takes_a_lora_file_its_scale_and_the_rest(sd_lora, tiny_sd_dir, tmp_path, capsys):
    from alignit_core.cli import main

    out = tmp_path / "out"
    assert main(["generate", "--model", str(tiny_sd_dir), "--concept", str(sd_lora["kohya"]), "--prompt",
                 "a photo of a sks", "--lora-scale", "0.5", "--lora-rest", "0.25", "--steps", "2",
                 "--out", str(out)]) == 0
    s = json.loads((out / "settings.json").read_text())
    assert s["concept"] == {"name": "sks", "token": "sks", "class_word": "dog", "kind": "lora", "scale": 0.5}
    assert s["lora_rest"] == 0.25 and s["p"] == "a photo of a dog"
    bad = _lora_file(tmp_path, _pair(width_in=768), "other.safetensors")
    assert main(["generate", "--model", str(tiny_sd_dir), "--concept", str(bad), "--token", "sks", "--class-word",
                 "dog", "--prompt", "a photo of a sks", "--out", str(tmp_path / "no")]) == 2
    assert "the LoRA is for another model" in capsys.readouterr().err and not (tmp_path / "no").exists()


def test_the_demo_reproduces_an_uploaded_lora_from_the_command_line(sd_lora, tiny_sd):
    import shlex

    from alignit_core.cli import parser as cli_parser

    uploaded, *_ = app.add_concept(tiny_sd, {}, {}, str(sd_lora["kohya"]), "", "", 0.5)
    values = dict(uploaded=uploaded, mode=app.ALIGNIT, concept_key="uploaded:sks", prompt="a photo of a sks",
                  positions=[], swaps="", seed=3, steps=2, guidance=5.0, size=64, scheduler="ddim", swap_uncond=False,
                  swap_start=0.0, swap_end=1.0, map_resolution=None, include_base=False, map_mode="overlay",
                  lora_rest=0.5)
    *_, command, gen, _, _ = app.generate(tiny_sd, {}, **values, progress=lambda *a, **k: None)
    args = cli_parser().parse_args(shlex.split(command)[3:])
    assert (args.concept, args.token, args.class_word) == (["sks.safetensors"], "sks", "dog")
    assert (args.lora_scale, args.lora_rest) == (0.5, 0.5) and gen.record()["concept"]["scale"] == 0.5
