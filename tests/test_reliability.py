"""Reliability under real use (issue #8): bad input refused alike by the API, the CLI and the UI;
untrusted concept files; a run that fails; a hundred runs in a row; and the served app with
several visitors at once, one of whom cancels or leaves.

Everything runs on the tiny SD pipeline (alignit_core.testing), so a generation takes a few hundredths of a
second; the served app paces each denoising step a little so that runs really overlap.
"""
from __future__ import annotations

import gc
import html
import inspect
import json
import math
import os
import socket
import threading
import time
import uuid
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import app
import alignit_core.concepts as concepts_module
import alignit_core.generate as generate_module
import alignit_core.models as models_module
from alignit_core import (AlignITError, ConceptError, ModelError, PromptError, Settings, SettingsError,
                          generate_concept, generate_swap, load_concept, load_model)
from alignit_core.cli import main as cli_main

WIDTH = 32  # the tiny SD's text-encoder width
GOOD = ("a jumping dog", [("dog", "zebra")], Settings(seed=1, steps=2))


@pytest.fixture(scope="module", autouse=True)
def one_thread_per_run():
    """The tiny model's thousands of small ops run 10-100x slower with an OpenMP team of two on a
    busy 2-core machine (each op waits for both threads); one thread per run keeps these tests fast,
    and two concurrent runs still use both cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------ shared pieces

def fingerprint(model) -> tuple:
    """What no request may change: the installed attention processors (the same objects), the
    tokenizer's vocabulary, the text encoder's embedding table and the UNet's weights."""
    table = model.text_encoders[0].get_input_embeddings().weight
    unet_sum = sum(float(p.double().sum()) for p in model.unet.parameters())
    return (tuple((name, id(proc)) for name, proc in model.unet.attn_processors.items()), len(model.tokenizer),
            tuple(table.shape), float(table.double().sum()), unet_sum)


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else Image.open(image).convert("RGB"))


def good_pixels(model) -> list[np.ndarray]:
    gen = generate_swap(model, *GOOD)
    return [pixels(gen.images[row]) for row in gen.rows]


class Evil:
    """Unpickling this would create `marker`: proof that a pickle ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def concepts(tiny_sd, tmp_path_factory) -> SimpleNamespace:
    """Concept folders for the tiny SD: textual inversion `<toy>` and Custom Diffusion `<new1>` (class
    word 'dog'), an SD 1.5-wide (768) embedding file `<wide>` and an SD 1.5 LoRA file; with the first
    two loaded."""
    root = tmp_path_factory.mktemp("concepts")
    g = torch.Generator().manual_seed(0)
    toy = root / "toy"
    toy.mkdir()
    save_file({"<toy>": torch.randn(1, WIDTH, generator=g)}, str(toy / "learned_embeds.safetensors"))
    (toy / "manifest.json").write_text(json.dumps({"token": "<toy>", "class_word": "dog", "kind": "textual_inversion",
                                                   "weights": "learned_embeds.safetensors"}))
    cd = root / "cd"
    cd.mkdir()
    save_file({"<new1>": torch.randn(1, WIDTH, generator=g)}, str(cd / "learned_embeds.safetensors"))
    weights = {}
    for layer, attn in tiny_sd.cross_attention_layers.items():
        for w, name in ((attn.to_k.weight, "to_k"), (attn.to_v.weight, "to_v")):
            w = w.detach().cpu()
            weights[f"{layer}.processor.{name}_custom_diffusion.weight"] = w + 0.5 * torch.randn(w.shape, generator=g)
    save_file(weights, str(cd / "pytorch_custom_diffusion_weights.safetensors"))
    (cd / "manifest.json").write_text(json.dumps({
        "token": "<new1>", "class_word": "dog", "kind": "custom_diffusion", "weights": "learned_embeds.safetensors",
        "custom_diffusion": "pytorch_custom_diffusion_weights.safetensors"}))
    wide = root / "wide.safetensors"
    save_file({"<wide>": torch.randn(1, 768, generator=g)}, str(wide))
    lora = root / "sd15_lora.safetensors"  # a kohya LoRA whose layer takes SD 1.5's 768-wide text
    layer = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file({f"{layer}.lora_down.weight": torch.zeros(4, 768), f"{layer}.lora_up.weight": torch.zeros(16, 4)},
              str(lora))
    hostile = {name: root / f"{name}.safetensors" for name in ("long_token", "float8", "huge_norm", "empty")}
    vector = torch.randn(1, WIDTH, generator=g)
    save_file({"<" + "x" * 99_998 + ">": vector}, str(hostile["long_token"]))
    save_file({"<f8>": vector.to(torch.float8_e4m3fn)}, str(hostile["float8"]))
    save_file({"<huge>": vector / vector.norm() * 1e38}, str(hostile["huge_norm"]))  # finite in float32
    header = json.dumps({f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
                         for i in range(2_000)}, separators=(",", ":")).encode()  # under the upload limit, all header
    hostile["empty"].write_bytes(len(header).to_bytes(8, "little") + header)
    hostile["lora_huge"] = root / "lora_huge.safetensors"  # a LoRA update of norm 9e31 on a (16, 32) layer
    layer = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file({f"{layer}.lora_down.weight": torch.ones(4, WIDTH), f"{layer}.lora_up.weight": torch.full((16, 4), 1e30)},
              str(hostile["lora_huge"]))
    return SimpleNamespace(toy_dir=toy, cd_dir=cd, wide=wide, lora=lora, toy=load_concept(toy, tiny_sd),
                           cd=load_concept(cd, tiny_sd), **hostile)


@pytest.fixture(scope="module")
def reference(tiny_sd) -> tuple:
    """The model's fingerprint and the good request's pixels before any bad request."""
    return fingerprint(tiny_sd), good_pixels(tiny_sd)


def assert_intact(model, reference) -> None:
    """The model is as loaded and the next good request gives the same pixels as before."""
    before, pixels_before = reference
    assert fingerprint(model) == before
    for a, b in zip(good_pixels(model), pixels_before, strict=True):
        assert np.array_equal(a, b)


def ui_generate(model, registry, **kw):
    """app.generate as the Generate button calls it, on the tiny SD, with `kw` changed."""
    values = dict(uploaded={}, mode=app.SWAP, concept_key=None, prompt="a jumping dog", positions=[],
                  swaps="dog=zebra", seed=1, steps=2, guidance=7.5, size=model.native_size, scheduler="ddim",
                  swap_uncond=False, swap_start=0.0, swap_end=1.0, map_resolution=None, include_base=False,
                  map_mode="overlay")
    values.update(kw)
    return app.generate(model, registry, **values, progress=lambda *a, **k: None)


def empty_cache_calls(monkeypatch) -> list:
    """Record calls of torch.cuda.empty_cache (a no-op on a CPU-only machine)."""
    calls = []
    real = torch.cuda.empty_cache
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: (calls.append(1), real())[1])
    return calls


# ------------------------------------------------------------------------------ the bad-input matrix

def _swap(m, c, prompt="a jumping dog", swaps=(("dog", "zebra"),), **settings):
    return generate_swap(m, prompt, list(swaps), Settings(**{"seed": 1, "steps": 2, **settings}))


def _concept(m, c, prompt="a photo of a <toy>", positions=None, **settings):
    return generate_concept(m, prompt, c.toy, Settings(**{"seed": 1, "steps": 2, **settings}), positions=positions)


LONG = " ".join(["a jumping dog"] * 26)  # 78 tokens
HUGE = ("a jumping dog " * 7_200)[:100_000]  # 100,000 characters
ENDLESS = " ".join(["A dog jumps over a red fence."] * 50)  # 400 tokens, over segment mode's 308 positions
TOY_PROMPT = ["--concept", "{toy}", "--prompt", "a photo of a <toy>"]
TOY_UI = dict(mode=app.ALIGNIT, concept_key="toy", prompt="a photo of a <toy>")


def _upload(file: str, class_word: str = "dog") -> dict:
    """The three surfaces of loading a bare embedding file `file` (a `concepts` attribute)."""
    return dict(api=lambda m, c: load_concept(getattr(c, file), m, class_word=class_word),
                cli=["--concept", "{" + file + "}", "--class-word", class_word, "--prompt", "a photo of a dog"],
                ui=lambda m, c: app.add_concept(m, {}, {}, str(getattr(c, file)), "", class_word))


@dataclass(frozen=True)
class Bad:
    """One bad input, as each surface takes it, and the words all three must show."""

    error: type[AlignITError]
    words: str
    api: object  # (model, concepts) -> raises
    cli: list[str]  # generate options over the default `--prompt 'a jumping dog' --swap dog=zebra`
    ui: object = field(default_factory=dict)  # app.generate keywords, or (model, concepts) -> raises


BAD = {
    "empty prompt": Bad(PromptError, "the prompt is empty", partial(_swap, prompt=""), ["--prompt", ""],
                        dict(prompt="")),
    "whitespace prompt": Bad(PromptError, "the prompt is empty", partial(_swap, prompt=" \t\n "),
                             ["--prompt", " \t\n "], dict(prompt=" \t\n ")),
    "over 75 tokens when long prompts are refused": Bad(
        PromptError, "this model reads at most 75", partial(_swap, prompt=LONG, long_prompt="refuse"),
        ["--prompt", LONG, "--long-prompt", "refuse"], dict(prompt=LONG, long_prompt="refuse")),
    "over what segment mode reads": Bad(PromptError, "segment mode reads at most", partial(_swap, prompt=ENDLESS),
                                        ["--prompt", ENDLESS], dict(prompt=ENDLESS)),
    "concept token absent": Bad(PromptError, "the concept token <toy> is not in the prompt",
                                partial(_concept, prompt="a photo of a dog"),
                                ["--concept", "{toy}", "--prompt", "a photo of a dog"],
                                {**TOY_UI, "prompt": "a photo of a dog"}),
    "concept token repeated": Bad(PromptError, "the concept token <toy> appears 2 times",
                                  partial(_concept, prompt="a <toy> beside a <toy>"),
                                  ["--concept", "{toy}", "--prompt", "a <toy> beside a <toy>"],
                                  {**TOY_UI, "prompt": "a <toy> beside a <toy>"}),
    "concept of another model's width": Bad(
        ConceptError, "the embedding of <wide> is 768 wide but tiny-sd's text encoder is 32 wide",
        lambda m, c: load_concept(c.wide, m, class_word="dog"),
        ["--concept", "{wide}", "--class-word", "dog", "--prompt", "a photo of a <wide>"],
        lambda m, c: app.add_concept(m, {}, {}, str(c.wide), "", "dog")),
    "LoRA of another model": Bad(
        ConceptError, "the LoRA's weights for down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k are (4, 768)",
        lambda m, c: load_concept(c.lora, m, token="sks", class_word="dog"),
        ["--concept", "{lora}", "--token", "sks", "--class-word", "dog", "--prompt", "a photo of a sks"],
        lambda m, c: app.add_concept(m, {}, {}, str(c.lora), "sks", "dog")),
    "position 0, the start token": Bad(PromptError, "position 0 is the start token",
                                       partial(_concept, positions=[0]), TOY_PROMPT + ["--positions", "0"],
                                       {**TOY_UI, "positions": [0]}),
    "position past the end": Bad(PromptError, "position 99 is outside the prompt", partial(_concept, positions=[99]),
                                 TOY_PROMPT + ["--positions", "99"], {**TOY_UI, "positions": [99]}),
    "negative position": Bad(PromptError, "position -1 is outside the prompt", partial(_concept, positions=[-1]),
                             TOY_PROMPT + ["--positions", "-1"], {**TOY_UI, "positions": [-1]}),
    "duplicated position": Bad(PromptError, "position 3 is given twice", partial(_concept, positions=[3, 3]),
                               TOY_PROMPT + ["--positions", "3", "3"], {**TOY_UI, "positions": [3, 3]}),
    "non-numeric position": Bad(PromptError, "position 'x' is not a whole number", partial(_concept, positions=["x"]),
                                TOY_PROMPT + ["--positions", "x"], {**TOY_UI, "positions": ["x"]}),
    "swap word absent": Bad(PromptError, "the word 'cat' is not in the prompt",
                            partial(_swap, swaps=[("cat", "zebra")]), ["--swap", "cat=zebra"], dict(swaps="cat=zebra")),
    "swap source longer than its target": Bad(
        PromptError, "'hippopotamus' is 3 tokens but 'dog' has only 1", partial(_swap, swaps=[("dog", "hippopotamus")]),
        ["--swap", "dog=hippopotamus"], dict(swaps="dog=hippopotamus")),
    "unknown concept": Bad(ConceptError, "unknown concept 'no-such-concept'",
                           lambda m, c: load_concept("no-such-concept", m),
                           ["--concept", "no-such-concept", "--prompt", "a photo of a <toy>"],
                           {**TOY_UI, "concept_key": "no-such-concept"}),
    "unknown model id, offline": Bad(ModelError, "model 'nobody/no-such-model' is not available offline",
                                     lambda m, c: load_model("nobody/no-such-model", device="cpu"),
                                     ["--model", "nobody/no-such-model"],
                                     lambda m, c: app.main(["--model", "nobody/no-such-model"])),
    "steps 0": Bad(SettingsError, "steps must be a whole number from 1 to 150", partial(_swap, steps=0),
                   ["--steps", "0"], dict(steps=0)),
    "steps above the cap": Bad(SettingsError, "steps must be a whole number from 1 to 150", partial(_swap, steps=151),
                               ["--steps", "151"], dict(steps=151)),
    "guidance NaN": Bad(SettingsError, "guidance must be a finite number", partial(_swap, guidance=math.nan),
                        ["--guidance", "nan"], dict(guidance=math.nan)),
    "guidance infinite": Bad(SettingsError, "guidance must be a finite number", partial(_swap, guidance=math.inf),
                             ["--guidance", "inf"], dict(guidance=math.inf)),
    "size not a multiple of 8": Bad(SettingsError, "size must be a multiple of 8 from 64 to 128",
                                    partial(_swap, size=100), ["--size", "100"], dict(size=100)),
    "size above the cap": Bad(SettingsError, "size must be a multiple of 8 from 64 to 128", partial(_swap, size=1024),
                              ["--size", "1024"], dict(size=1024)),
    "negative seed": Bad(SettingsError, "seed must be a whole number from 0 to 4294967295", partial(_swap, seed=-1),
                         ["--seed", "-1"], dict(seed=-1)),
    "seed past 2**32 - 1": Bad(SettingsError, "seed must be a whole number from 0 to 4294967295",
                               partial(_swap, seed=2**32), ["--seed", str(2**32)], dict(seed=2**32)),
    # hostile visitors: each is refused at once, before the costly part
    "concept token of 100,000 characters": Bad(ConceptError, "is 100000 characters; the limit is 64",
                                               **_upload("long_token")),
    "class word of 100,000 characters": Bad(ConceptError, "the class word cccccccc",
                                            **_upload("wide", class_word="c" * 100_000)),
    "safetensors of 2,000 empty tensors": Bad(ConceptError, "empty.safetensors holds 2000 tensors; a concept file "
                                                            "holds at most 1024", **_upload("empty")),
    "float8 embedding": Bad(ConceptError, "float8.safetensors holds F8_E4M3 numbers, which concepts cannot use",
                            **_upload("float8")),
    "embedding of norm 1e38": Bad(ConceptError, "has norm 1e+38, over 100 times that of tiny-sd's longest token",
                                  **_upload("huge_norm")),
    "LoRA update of norm 1e30": Bad(
        ConceptError, "have norm 9.05e+31, over 100 times that of tiny-sd's own",
        lambda m, c: load_concept(c.lora_huge, m, token="sks", class_word="dog"),
        ["--concept", "{lora_huge}", "--token", "sks", "--class-word", "dog", "--prompt", "a photo of a sks"],
        lambda m, c: app.add_concept(m, {}, {}, str(c.lora_huge), "sks", "dog")),
    "prompt of 100,000 characters with two concepts": Bad(
        PromptError, "the prompt is 100000 characters; the limit is 4000",
        lambda m, c: generate_concept(m, HUGE, [c.toy, c.cd], Settings(seed=1, steps=2)),
        ["--concept", "{toy}", "--concept", "{cd_dir}", "--prompt", HUGE],
        {**TOY_UI, "prompt": HUGE, "second_concept": "cd"}),
    "20,000 swaps, keys only at half strength": Bad(
        PromptError, "there are 20000 swaps; the limit is 75",
        partial(_swap, swaps=[("dog", "zebra")] * 20_000, swap_kv="k", swap_strength=0.5),
        ["--swap", "dog=zebra"] * 20_000 + ["--swap-kv", "k", "--swap-strength", "0.5"],
        dict(swaps="\n".join(["dog=zebra"] * 20_000), swap_kv="k", swap_strength=0.5)),
    "prompt of 100,000 characters, truncated": Bad(
        PromptError, "the prompt is 100000 characters; the limit is 4000",
        partial(_swap, prompt=HUGE, long_prompt="truncate"), ["--prompt", HUGE, "--long-prompt", "truncate"],
        dict(prompt=HUGE, long_prompt="truncate")),
    "20,000 swaps": Bad(PromptError, "there are 20000 swaps; the limit is 75",
                        partial(_swap, swaps=[("dog", "zebra")] * 20_000), ["--swap", "dog=zebra"] * 20_000,
                        dict(swaps="\n".join(["dog=zebra"] * 20_000))),
    "a swap of 100,000 characters": Bad(PromptError, "is 100004 characters; the limit is 200",
                                        partial(_swap, swaps=[("dog", "z" * 100_000)]),
                                        ["--swap", "dog=" + "z" * 100_000], dict(swaps="dog=" + "z" * 100_000)),
}


def _cli_argv(case: Bad, c, out: Path) -> list[str]:
    files = {"{toy}": c.toy_dir, **{"{" + k + "}": v for k, v in vars(c).items() if isinstance(v, Path)}}
    extra = [str(files.get(a, a)) for a in case.cli]
    argv = ["generate", "--model", "tiny", "--steps", "2", "--out", str(out)]
    if "--prompt" not in extra:
        argv += ["--prompt", "a jumping dog"]
    if "--concept" not in extra and "--swap" not in extra:
        argv += ["--swap", "dog=zebra"]
    return argv + extra


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_gets_the_same_clear_message_from_api_cli_and_ui_and_harms_nothing(
        name, tiny_sd, concepts, reference, monkeypatch, capsys, tmp_path):
    case = BAD[name]
    # API: the typed exception
    with pytest.raises(AlignITError) as api:
        case.api(tiny_sd, concepts)
    assert type(api.value) is case.error and case.words in str(api.value)

    # CLI: exit status 2, one `error:` line with the same words, nothing written. The CLI gets the
    # same loaded model, so that the check below covers it too.
    real_load = models_module.load_model
    monkeypatch.setattr(models_module, "load_model", lambda name, device=None: tiny_sd if name == "tiny"
                        else real_load(name, device))
    out = tmp_path / "out"
    capsys.readouterr()
    assert cli_main(_cli_argv(case, concepts, out)) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and case.words in lines[0] and "Traceback" not in err, err
    assert not out.exists()

    # UI: a gr.Error toast titled by the error's kind; the model id is chosen at start-up, where the
    # app refuses to start with the same line
    registry = {"toy": concepts.toy, "cd": concepts.cd}
    if name == "unknown model id, offline":
        assert case.ui(tiny_sd, concepts) == 2
        assert case.words in capsys.readouterr().out
    else:
        with pytest.raises(gr.Error) as ui:
            case.ui(tiny_sd, concepts) if callable(case.ui) else ui_generate(tiny_sd, registry, **case.ui)
        assert case.words in html.unescape(ui.value.message)  # the toast shows it as written (HTML-escaped)
        assert ui.value.title == case.error.__name__.removesuffix("Error") + " error"

    assert_intact(tiny_sd, reference)


# ------------------------------------------------------------------------------ untrusted files

@pytest.mark.parametrize("suffix", [".bin", ".pt", ".ckpt", ".pth"])
def test_an_uploaded_pickle_is_refused_unopened_and_its_code_never_runs(suffix, tiny_sd, reference, tmp_path,
                                                                        monkeypatch):
    marker = tmp_path / "pwned"
    path = tmp_path / f"learned_embeds{suffix}"
    torch.save({"<x>": Evil(marker)}, path)
    opened = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: opened.append(a) or pytest.fail("torch.load was called"))
    with pytest.raises(gr.Error, match="only .safetensors can be uploaded"):
        app.add_concept(tiny_sd, {}, {}, str(path), "<x>", "cat")
    assert not opened and not marker.exists()
    assert_intact(tiny_sd, reference)


def test_a_pickle_dressed_as_safetensors_is_refused_and_never_runs(tiny_sd, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "learned_embeds.safetensors"
    torch.save({"<x>": Evil(marker)}, path)  # a pickle (zip) under the safetensors name
    with pytest.raises(gr.Error, match="not a valid safetensors file"):
        app.add_concept(tiny_sd, {}, {}, str(path), "<x>", "cat")
    assert not marker.exists()


@pytest.mark.parametrize("tensors, token, words", [
    ({"<a>": torch.zeros(WIDTH), "<b>": torch.zeros(WIDTH)}, "", "must hold one token's embedding"),
    ({"<x>": torch.zeros(1, 1, WIDTH)}, "", "must be (vectors, width), got (1, 1, 32)"),
    ({"<x>": torch.zeros(17, WIDTH)}, "", "must be (vectors, width), got (17, 32)"),
    ({"<x>": torch.zeros(0, WIDTH)}, "", "must be (vectors, width), got (0, 32)"),
    ({"<x>": torch.full((1, WIDTH), math.nan)}, "", "finite floating-point numbers"),
    ({"<x>": torch.ones(1, WIDTH, dtype=torch.int32)}, "", "finite floating-point numbers"),
    ({"<x>": torch.zeros(1, WIDTH)}, "<my cat>", "must be one word without spaces"),
], ids=["two tensors", "3-D", "17 vectors", "no vectors", "NaN", "integers", "token with a space"])
def test_uploaded_tensors_are_checked_by_name_and_shape_before_use(tensors, token, words, tiny_sd, reference,
                                                                   tmp_path):
    path = tmp_path / "learned_embeds.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(gr.Error) as e:
        app.add_concept(tiny_sd, {}, {}, str(path), token, "cat")
    assert words in e.value.message and e.value.title == "Concept error"
    assert_intact(tiny_sd, reference)


def test_an_upload_over_the_size_cap_is_refused_before_it_is_read(tiny_sd, tmp_path, monkeypatch):
    path = tmp_path / "learned_embeds.safetensors"
    save_file({"<x>": torch.zeros(16, WIDTH)}, str(path))
    assert path.stat().st_size > 1024
    monkeypatch.setattr(app, "MAX_UPLOAD_BYTES", 1024)
    monkeypatch.setattr(concepts_module, "load_file", lambda *a: pytest.fail("the oversized file was read"))
    with pytest.raises(gr.Error, match="the limit is"):
        app.add_concept(tiny_sd, {}, {}, str(path), "", "cat")


def test_a_local_pickle_is_loaded_with_weights_only(tiny_sd, tmp_path, monkeypatch):
    folder = tmp_path / "toy"
    folder.mkdir()
    torch.save({"<toy>": torch.zeros(1, WIDTH)}, folder / "learned_embeds.bin")
    (folder / "manifest.json").write_text(json.dumps({"token": "<toy>", "class_word": "dog",
                                                      "kind": "textual_inversion", "weights": "learned_embeds.bin"}))
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: (calls.append(k), real(*a, **k))[1])
    assert load_concept(folder, tiny_sd).n_vectors == 1
    assert calls and all(k.get("weights_only") is True for k in calls)


@pytest.mark.parametrize("role", ["custom_diffusion", "text_encoder"])
def test_a_malicious_pickle_in_any_manifest_role_never_runs(role, tiny_sd, tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "evil"
    folder.mkdir()
    save_file({"<x>": torch.zeros(1, WIDTH)}, str(folder / "learned_embeds.safetensors"))
    evil = {"unet": {"layer.to_k.weight": Evil(marker)}} if role == "custom_diffusion" else {"w": Evil(marker)}
    torch.save(evil, folder / "evil.bin")
    kind = "custom_diffusion" if role == "custom_diffusion" else "text_encoder"
    (folder / "manifest.json").write_text(json.dumps({"token": "<x>", "class_word": "dog", "kind": kind,
                                                      "weights": "learned_embeds.safetensors", role: "evil.bin"}))
    with pytest.raises(ConceptError, match="could not be loaded safely"):
        load_concept(folder, tiny_sd)
    assert not marker.exists()


@pytest.mark.parametrize("role", ["weights", "custom_diffusion", "text_encoder"])
@pytest.mark.parametrize("escape", ["parent", "absolute", "symlink"])
def test_a_manifest_path_out_of_its_folder_is_refused_unread(role, escape, tiny_sd, tmp_path, monkeypatch):
    outside = tmp_path / "secret.safetensors"
    save_file({"<x>": torch.zeros(1, WIDTH)}, str(outside))  # a real, loadable file
    folder = tmp_path / "concept"
    folder.mkdir()
    save_file({"<x>": torch.zeros(1, WIDTH)}, str(folder / "learned_embeds.safetensors"))
    if escape == "symlink":
        (folder / "link.safetensors").symlink_to(outside)
    ref = {"parent": "../secret.safetensors", "absolute": str(outside), "symlink": "link.safetensors"}[escape]
    kind = {"weights": "textual_inversion"}.get(role, role)
    manifest = {"token": "<x>", "class_word": "dog", "kind": kind, "weights": "learned_embeds.safetensors", role: ref}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    read = []
    real = concepts_module.load_file
    monkeypatch.setattr(concepts_module, "load_file", lambda p, *a: (read.append(Path(p).resolve()), real(p, *a))[1])
    with pytest.raises(ConceptError, match="outside the concept folder"):
        load_concept(folder, tiny_sd)
    assert outside.resolve() not in read


# ------------------------------------------------------------------------------ a run that fails

def _fail_at_step_1(error: BaseException):
    def on_kv(layer, step, key, value):
        if step == 1:
            raise error
    return on_kv


def test_an_exception_in_the_denoising_loop_reaches_its_caller_and_empties_the_cache(tiny_sd, reference, monkeypatch):
    emptied = empty_cache_calls(monkeypatch)
    with pytest.raises(RuntimeError, match="forced failure"):
        generate_swap(tiny_sd, *GOOD, on_kv=_fail_at_step_1(RuntimeError("forced failure")))
    assert emptied == [1]
    assert_intact(tiny_sd, reference)
    assert emptied == [1]  # a run that succeeds keeps its cache


OOM = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
OOM_WORDS = "out of GPU memory; try a smaller size or fewer steps"


def test_out_of_gpu_memory_is_a_clear_model_error_on_every_surface(tiny_sd, reference, monkeypatch, capsys, tmp_path):
    emptied = empty_cache_calls(monkeypatch)
    with pytest.raises(ModelError, match=OOM_WORDS):
        generate_swap(tiny_sd, *GOOD, on_kv=_fail_at_step_1(OOM))
    assert emptied == [1]
    # the CLI and the app, with the same failure forced into their runs
    real_swap = generate_module.generate_swap
    monkeypatch.setattr(generate_module, "generate_swap", partial(real_swap, on_kv=_fail_at_step_1(OOM)))
    monkeypatch.setattr(app, "generate_swap", partial(real_swap, on_kv=_fail_at_step_1(OOM)))
    monkeypatch.setattr(models_module, "load_model", lambda name, device=None: tiny_sd)
    capsys.readouterr()
    assert cli_main(["generate", "--model", "tiny", "--prompt", "a jumping dog", "--swap", "dog=zebra",
                     "--steps", "2", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"error: {OOM_WORDS}"
    with pytest.raises(gr.Error) as ui:
        ui_generate(tiny_sd, {})
    assert ui.value.message == OOM_WORDS and ui.value.title == "Model error"
    assert emptied == [1, 1, 1]
    monkeypatch.undo()
    assert_intact(tiny_sd, reference)


def test_the_app_reports_an_unexpected_failure_to_its_visitor_as_a_toast(tiny_sd, reference, monkeypatch):
    boom = _fail_at_step_1(RuntimeError("/srv/secret/path: something broke"))
    monkeypatch.setattr(app, "generate_swap", partial(generate_swap, on_kv=boom))
    with pytest.raises(gr.Error) as ui:
        ui_generate(tiny_sd, {})
    assert ui.value.message == "the generation failed (RuntimeError); the model is unchanged, try again"
    assert "/srv/secret" not in ui.value.message  # internals stay in the server log
    monkeypatch.undo()
    assert_intact(tiny_sd, reference)


# ------------------------------------------------------------------------------ long life

def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc")
def test_a_hundred_generations_leave_the_model_as_loaded_and_memory_flat(tiny_sd, concepts, reference):
    prompts = ["a jumping dog", "a red circle on a blue background", "banana in a white plate",
               "a small dog in the snow", "two cats on a green sofa"]
    sources = ["zebra", "yellow", "black", "tiger", "pink"]

    def request(i: int):
        s = Settings(seed=i, steps=2, scheduler=("ddim", "euler", "dpm++")[i % 3])
        kind = i % 4
        if kind == 0:
            return generate_swap(tiny_sd, prompts[i % 5], [(1 + i % 3, sources[i % 5])], s)
        if kind == 1:
            return generate_concept(tiny_sd, f"a photo of a <toy> number {i}", concepts.toy, s)
        if kind == 2:
            return generate_concept(tiny_sd, "a <new1> on the grass", concepts.cd, s, include_base=True)
        return generate_swap(tiny_sd, prompts[i % 5], [(3, sources[i % 5])], s)

    before, _ = reference
    rss, failures, t0 = [], 0, time.perf_counter()
    for i in range(100):
        request(i)
        if i % 10 == 5:  # failures along the way: a bad input and a run broken mid-loop
            with pytest.raises(PromptError):
                generate_swap(tiny_sd, "a jumping dog", [("cat", "zebra")], Settings(steps=2))
            with pytest.raises(RuntimeError):
                generate_swap(tiny_sd, *GOOD, on_kv=_fail_at_step_1(RuntimeError("forced")))
            failures += 2
        gc.collect(1)  # the young generations: what a request leaves in cycles (a full pass costs 0.3 s here)
        rss.append(rss_kib())
        if i == 49:
            tensors_at_50 = live_tensors()
    elapsed = time.perf_counter() - t0
    tensors_at_100 = live_tensors()
    slope = float(np.polyfit(np.arange(50), np.array(rss[50:], dtype=float), 1)[0])
    print(f"\n100 generations (+{failures} failures) in {elapsed:.1f}s; RSS {rss[0] / 1024:.1f} -> "
          f"{rss[49] / 1024:.1f} -> {rss[-1] / 1024:.1f} MiB; slope over the last 50: {slope:+.1f} KiB/generation; "
          f"live tensors {tensors_at_50} -> {tensors_at_100}")
    assert fingerprint(tiny_sd) == before  # processors, tokenizer, embedding table, weights
    assert tensors_at_100 == tensors_at_50  # nothing a request made is still held
    assert slope < 50, f"resident memory grows {slope:.1f} KiB per generation"


# ------------------------------------------------------------------------------ the served app

PACE_S = 0.02  # each served denoising step sleeps this long, so that runs overlap


class Probe:
    """What the served app's runs do, seen from inside the engine: how many generations and scores
    (one concurrency group) and how many token views run at once, and how many steps each
    generation has taken. Words in a prompt steer a run: 'slowly' (0.2 s a step; a token view of it
    takes 0.3 s), 'explodes' (a RuntimeError at step 1). Every score takes at least 0.5 s."""

    def __init__(self):
        self.lock = threading.Lock()
        self.now = {"heavy": 0, "views": 0}
        self.top = {"heavy": 0, "views": 0}
        self.steps: dict[str, int] = {}  # prompt -> steps taken by its latest run

    @property
    def running(self) -> int:
        return self.now["heavy"]

    @property
    def peak(self) -> int:
        return self.top["heavy"]

    @contextmanager
    def counted(self, kind: str):
        with self.lock:
            self.now[kind] += 1
            self.top[kind] = max(self.top[kind], self.now[kind])
        try:
            yield
        finally:
            with self.lock:
                self.now[kind] -= 1

    def wrap(self, real):
        def run(model, text, *args, **kw):
            slow, explodes = "slowly" in text, "explodes" in text

            def on_kv(layer, step, key, value):
                if not layer.startswith("mid_block"):  # once per step
                    return
                if explodes and step == 1:
                    raise RuntimeError("forced failure inside the denoising loop")
                with self.lock:
                    self.steps[text] = step + 1
                time.sleep(0.2 if slow else PACE_S)

            with self.counted("heavy"):
                return real(model, text, *args, on_kv=on_kv, **kw)
        return run

    def wrap_score(self, real):
        def run(*args, **kw):
            with self.counted("heavy"):
                time.sleep(0.5)
                return real(*args, **kw)
        return run

    def wrap_view(self, real):
        def view(model, mode, prompt, *args, **kw):
            with self.counted("views"):
                if "slowly" in (prompt or ""):
                    time.sleep(0.3)
                return real(model, mode, prompt, *args, **kw)
        return view

    def reset_peak(self, kind: str = "heavy") -> None:
        with self.lock:
            self.top[kind] = self.now[kind]

    def wait(self, condition, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(tiny_sd, concepts, **patches):
    """The app on the tiny SD with both concepts, queued and launched as `python app.py` does, on a free
    port, with the Probe in its runs and `patches` (app attributes) in place."""
    probe = Probe()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(app, "generate_swap", probe.wrap(generate_swap))
        mp.setattr(app, "generate_concept", probe.wrap(generate_concept))
        mp.setattr(app, "score_generation", probe.wrap_score(app.score_generation))
        mp.setattr(app, "token_view", probe.wrap_view(app.token_view))
        for name, value in patches.items():
            mp.setattr(app, name, value)
        demo = app.build_demo(tiny_sd, [concepts.toy, concepts.cd])
        port = _free_port()
        app.launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        try:
            yield SimpleNamespace(url=f"http://127.0.0.1:{port}/", demo=demo, probe=probe)
        finally:
            demo.close()


@pytest.fixture(scope="module")
def served(tiny_sd, concepts):
    with serve(tiny_sd, concepts) as app_on_a_port:
        yield app_on_a_port


def _client(url):
    from gradio_client import Client

    return Client(url, verbose=False)


def _request(**kw) -> dict:
    return {"mode": app.SWAP, "concept_key": "toy", "seed": 0, "steps": 6, "guidance": 7.5, "size": 64,
            "scheduler": "ddim", "map_resolution": 8, **kw}


def _outcome(job) -> tuple:
    """('ok', pixels of every image and heat map, settings.json, CLI line) or ('error', message)."""
    from gradio_client.exceptions import AppError

    try:
        out = job.result(timeout=120)
    except AppError as e:
        return ("error", str(e))
    shown = [None if p is None else pixels(p) for p in out[: 2 * app.MAX_COLUMNS]]
    return ("ok", shown, Path(out[2 * app.MAX_COLUMNS + 1]).read_text(), out[2 * app.MAX_COLUMNS + 2])


VISITORS = {
    "dog to zebra": _request(prompt="a jumping dog", swaps="dog=zebra", seed=1),
    "white plate to black": _request(prompt="banana in a white plate", swaps="4=black", seed=2, steps=5,
                                     scheduler="euler", guidance=6.0),
    "textual inversion, with the base model": _request(mode=app.ALIGNIT, concept_key="toy",
                                                       prompt="a photo of a <toy> in the snow", seed=3,
                                                       include_base=True),
    "Custom Diffusion, both CFG halves": _request(mode=app.ALIGNIT, concept_key="cd", prompt="a <new1> on the grass",
                                                  seed=4, swap_uncond=True),
    "bad input": _request(prompt="a red circle", swaps="cat=zebra"),
    "run that fails mid-loop": _request(prompt="a dog that explodes", swaps="dog=zebra"),
}


def _same(alone: tuple, together: tuple) -> bool:
    if alone[0] != together[0]:
        return False
    if alone[0] == "error":
        return alone == together
    shown_a, shown_b = alone[1], together[1]
    return (all((a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))
                for a, b in zip(shown_a, shown_b, strict=True)) and alone[2:] == together[2:])


def test_concurrent_visitors_each_get_what_they_get_alone(served):
    assert app.HEAVY["concurrency_limit"] >= 2
    client = _client(served.url)
    alone = {name: _outcome(client.submit(**req, api_name="/generate")) for name, req in VISITORS.items()}
    assert [k for k, v in alone.items() if v[0] == "error"] == ["bad input", "run that fails mid-loop"]
    assert "the word 'cat' is not in the prompt" in alone["bad input"][1]
    assert "the generation failed (RuntimeError)" in alone["run that fails mid-loop"][1]

    served.probe.reset_peak()
    clients = {name: _client(served.url) for name in VISITORS}  # one visitor each, all at once
    jobs = {name: clients[name].submit(**req, api_name="/generate") for name, req in VISITORS.items()}
    together = {name: _outcome(job) for name, job in jobs.items()}
    assert served.probe.peak == app.HEAVY["concurrency_limit"], "the runs never overlapped"
    for name in VISITORS:
        assert _same(alone[name], together[name]), name


def _slow_run_started(served, prompt: str, steps: int = 3) -> bool:
    return served.probe.wait(lambda: served.probe.steps.get(prompt, 0) >= steps)


def _two_visitors_run_at_once(served) -> None:
    served.probe.reset_peak()
    a, b = _client(served.url), _client(served.url)
    jobs = [a.submit(**_request(prompt="a jumping dog", swaps="dog=zebra", steps=20), api_name="/generate"),
            b.submit(**_request(prompt="a red circle", swaps="red=blue", steps=20), api_name="/generate")]
    assert [_outcome(job)[0] for job in jobs] == ["ok", "ok"]
    assert served.probe.peak == 2


def test_a_cancelled_run_stops_and_its_slot_serves_the_next_visitors(served):
    prompt = "a dog jumping slowly"  # 100 steps at 0.2 s: 20 s if it ran to the end
    job = _client(served.url).submit(**_request(prompt=prompt, swaps="dog=zebra", steps=100), api_name="/generate")
    assert _slow_run_started(served, prompt)
    job.cancel()
    assert served.probe.wait(lambda: served.probe.running == 0, timeout=5), "the cancelled run went on"
    assert served.probe.steps[prompt] < 50  # of 100
    _two_visitors_run_at_once(served)


def test_a_visitor_who_leaves_mid_run_frees_the_slot(served):
    """A browser tab closed mid-run: its event stream drops. Driven over plain HTTP, as the page does."""
    import httpx

    prompt = "a cat sleeping slowly"
    fn = next(f for f in served.demo.fns.values() if f.api_name == "generate")
    names = list(inspect.signature(app.generate).parameters)[2:]  # the handler's inputs, after model and concepts
    values = _request(prompt=prompt, swaps="cat=dog", steps=100)
    data = [None if isinstance(block, gr.State) else values.get(name, block.value)
            for name, block in zip(names, fn.inputs)]
    session = uuid.uuid4().hex
    body = {"data": data, "fn_index": fn._id, "session_hash": session, "event_data": None, "trigger_id": None}
    r = httpx.post(served.url + "gradio_api/queue/join", json=body)
    r.raise_for_status()
    with httpx.stream("GET", served.url + "gradio_api/queue/data", params={"session_hash": session},
                      timeout=30) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:") and json.loads(line[5:])["msg"] == "progress" and \
                    served.probe.steps.get(prompt, 0) >= 3:
                break  # leaving the `with` closes the connection
    assert served.probe.wait(lambda: served.probe.running == 0, timeout=5), "the abandoned run went on"
    assert served.probe.steps[prompt] < 50  # of 100
    _two_visitors_run_at_once(served)


# ------------------------------------------------------------------------------ hostile visitors, served

def test_generations_and_scores_share_the_two_slots(served):
    """Two visitors score (0.5 s each at least) while two others generate slowly: the four never run
    more than two at once, so that they share the cores two ways, not four."""
    scorers = [_client(served.url) for _ in range(2)]
    for i, scorer in enumerate(scorers):  # each scores a generation of its own
        assert _outcome(scorer.submit(**_request(prompt="a jumping dog", swaps="dog=zebra", seed=i, steps=2),
                                      api_name="/generate"))[0] == "ok"
    served.probe.reset_peak()
    jobs = [scorer.submit(map_mode="overlay", api_name="/score") for scorer in scorers]
    jobs += [_client(served.url).submit(**_request(prompt=f"a cat sleeping slowly {i}", swaps="cat=dog", steps=5),
                                        api_name="/generate") for i in range(2)]
    for job in jobs:
        job.result(timeout=120)
    assert served.probe.peak == app.HEAVY["concurrency_limit"] == 2


def test_a_flood_of_token_table_requests_runs_a_few_at_a_time(served):
    visitors = [_client(served.url) for _ in range(6)]
    served.probe.reset_peak("views")
    jobs = [visitor.submit(mode=app.SWAP, concept_key=None, prompt=f"a dog jumping slowly {i}", swaps="",
                           long="segments", api_name="/tokens") for i, visitor in enumerate(visitors)]
    for job in jobs:
        job.result(timeout=60)
    assert served.probe.top["views"] == app.TOKEN_VIEWS["concurrency_limit"] < 6


def test_a_visitors_last_generation_is_dropped_once_its_time_to_live_is_over(tiny_sd, concepts):
    from gradio_client.exceptions import AppError

    with serve(tiny_sd, concepts, STATE_TTL_S=1) as short_lived:
        visitor = _client(short_lived.url)
        assert _outcome(visitor.submit(**_request(prompt="a jumping dog", swaps="dog=zebra", steps=2),
                                       api_name="/generate"))[0] == "ok"
        state = short_lived.demo.state_holder.session_data[visitor.session_hash].state_data
        kept = weakref.ref(next(v for v in state.values() if isinstance(v, generate_module.Generation)))
        assert short_lived.probe.wait(lambda: gc.collect() >= 0 and kept() is None, timeout=10), \
            "the generation outlived its time to live"
        with pytest.raises(AppError, match="generate images first"):
            visitor.predict(map_mode="overlay", api_name="/score")


def test_state_is_kept_for_the_most_recently_active_visitors_only(tiny_sd, concepts):
    from gradio_client.exceptions import AppError

    with serve(tiny_sd, concepts, SESSIONS=2) as few:
        visitors = [_client(few.url) for _ in range(3)]
        for visitor in visitors:
            assert _outcome(visitor.submit(**_request(prompt="a jumping dog", swaps="dog=zebra", steps=2),
                                           api_name="/generate"))[0] == "ok"
        assert len(few.demo.state_holder.session_data) == 2
        with pytest.raises(AppError, match="generate images first"):  # the first visitor's generation is gone
            visitors[0].predict(map_mode="overlay", api_name="/score")
        assert visitors[2].predict(map_mode="overlay", api_name="/score")[0].startswith("Every image scored")


def test_the_served_app_refuses_an_upload_over_its_limit_as_it_streams_in(served, tmp_path):
    """An upload over the largest a LoRA may be is refused by the server (413) as it streams in, before
    the callback ever sees it."""
    import httpx

    big = tmp_path / "lora.safetensors"
    with big.open("wb") as f:
        f.truncate(app.MAX_UPLOAD_BYTES + 1)  # sparse: zeros read back, no disk taken
    small = tmp_path / "small.safetensors"
    small.write_bytes(b"\0" * 4096)
    for path, status in ((big, 413), (small, 200)):
        with path.open("rb") as f:
            r = httpx.post(served.url + "gradio_api/upload", files={"files": (path.name, f)}, timeout=60)
        assert r.status_code == status, (path.name, r.text[:200])
