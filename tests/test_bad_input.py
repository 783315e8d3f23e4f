"""Bad input is refused alike by the API, the CLI and the UI, with the same clear words, and harms
nothing: each case of the matrix below through all three surfaces, then the model checked intact.

Everything runs on the tiny SD pipeline (alignit_core.testing), so a generation takes a few
hundredths of a second.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import gradio as gr
import pytest

import app
import alignit_core.models as models_module
from alignit_core import (AlignITError, ConceptError, ModelError, PromptError, Settings, SettingsError,
                          generate_concept, generate_swap, load_concept, load_model)
from alignit_core.cli import main as cli_main
from reliability import assert_intact, ui_generate

pytestmark = pytest.mark.usefixtures("one_thread_per_run")


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
