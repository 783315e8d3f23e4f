"""Hostile visitors: a concept file or a request built to cost the server time or memory is refused
from what it costs least to read (a file's header, a text's length), with a message for people.

The same refusals through the API, the CLI and the UI, with their words, are in the bad-input
matrix of tests/test_bad_input.py; the served app's concurrency is in tests/test_served_app.py and
memory over a hundred generations in tests/test_many_generations.py.
"""
from __future__ import annotations

import html
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import alignit_core.concept_files as concept_files
import alignit_core.lora as lora_module
import app
from alignit_core import ConceptError, PromptError, Settings, generate_concept, load_concept
from alignit_core.concept_files import MAX_LORA_TENSORS, MAX_TENSORS
from alignit_core.concepts import MAX_NORM_RATIO, MAX_WORD_CHARS
from alignit_core.memory import release_memory

WIDTH = 32  # the tiny SD's text-encoder width
REPO = Path(__file__).resolve().parents[1]


def header_only(path: Path, tensors: dict) -> Path:
    """A safetensors file with `tensors` (name -> header entry) and no data: what an attacker can
    write without holding a single number."""
    header = json.dumps(tensors, separators=(",", ":")).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    return path


def empty(count: int) -> dict:
    return {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(count)}


@pytest.fixture
def never_loaded(monkeypatch):
    """Fail the test if any tensor of a safetensors file is loaded."""
    monkeypatch.setattr(concept_files, "load_file", lambda *a, **k: pytest.fail("a tensor was loaded"))


@pytest.fixture
def lora_never_opened(monkeypatch):
    """Fail the test if the LoRA reader opens the file (its header is judged before it does)."""
    monkeypatch.setattr(lora_module, "safe_open", lambda *a, **k: pytest.fail("the LoRA reader opened the file"))


def largest_token_norm(model) -> float:
    return float(model.text_encoders[0].get_input_embeddings().weight.norm(dim=1).max())


# ------------------------------------------------------------------------------ safetensors headers

@pytest.mark.parametrize("count, words", [
    (700_000, r"lists too many tensors for a concept: its header is 3\d\.\d MiB; the limit is 1 MiB"),
    (MAX_TENSORS + 1, f"holds {MAX_TENSORS + 1} tensors; a concept file holds at most {MAX_TENSORS}"),
], ids=["700,000 (a 39 MB header)", "one over the limit"])
def test_a_file_of_many_empty_tensors_is_refused_from_its_header_alone(count, words, tiny_sd, tmp_path, never_loaded):
    path = header_only(tmp_path / "learned_embeds.safetensors", empty(count))
    with pytest.raises(ConceptError, match=words):
        load_concept(path, tiny_sd, class_word="dog", allow_pickle=False)


@pytest.mark.parametrize("dtype", ["F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "U64", "C64"])
def test_a_number_type_the_model_cannot_use_is_refused_by_name_before_loading(dtype, tiny_sd, tmp_path, never_loaded):
    path = header_only(tmp_path / "learned_embeds.safetensors",
                       {"<toy>": {"dtype": dtype, "shape": [1, WIDTH], "data_offsets": [0, 0]}})
    with pytest.raises(ConceptError, match=f"the tensor <toy> in learned_embeds.safetensors holds {dtype} numbers, "
                                           f"which concepts cannot use; save it as float16, bfloat16"):
        load_concept(path, tiny_sd, class_word="dog")


def test_a_real_float8_file_is_refused_by_name(tiny_sd, tmp_path):
    path = tmp_path / "learned_embeds.safetensors"
    save_file({"<toy>": torch.randn(1, WIDTH).to(torch.float8_e4m3fn)}, str(path))
    with pytest.raises(ConceptError, match="holds F8_E4M3 numbers"):
        load_concept(path, tiny_sd, class_word="dog")


@pytest.mark.parametrize("entry, words", [
    ({"dtype": "F32", "shape": [4, WIDTH], "data_offsets": [0, 4]}, "the shape of <toy> does not match its data"),
    ({"dtype": "F32", "shape": [-1, WIDTH], "data_offsets": [0, 0]}, "the shape of <toy> does not match its data"),
    ({"dtype": ["F32"], "shape": [1, WIDTH], "data_offsets": [0, 128]}, "holds ['F32'] numbers"),
    ({"dtype": "F32", "shape": [2**30, WIDTH], "data_offsets": [0, 2**37]}, "holds 131072.0 MiB of tensors; the limit"),
], ids=["too little data", "negative size", "a list for a type", "128 GiB declared"])
def test_a_header_whose_sizes_do_not_add_up_is_refused_before_loading(entry, words, tiny_sd, tmp_path, never_loaded):
    path = header_only(tmp_path / "learned_embeds.safetensors", {"<toy>": entry})
    with pytest.raises(ConceptError, match=words.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        load_concept(path, tiny_sd, class_word="dog")


def test_a_header_longer_than_the_file_is_not_a_valid_safetensors_file(tiny_sd, tmp_path, never_loaded):
    path = tmp_path / "learned_embeds.safetensors"
    path.write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(ConceptError, match="not a valid safetensors file \\(its header is longer than the file\\)"):
        load_concept(path, tiny_sd, class_word="dog")


def test_a_pickled_float8_embedding_in_a_local_folder_is_refused_by_name(tiny_sd, tmp_path):
    path = tmp_path / "learned_embeds.bin"
    torch.save({"<toy>": torch.randn(1, WIDTH).to(torch.float8_e5m2)}, path)
    with pytest.raises(ConceptError, match=r"the embedding of <toy> holds float8_e5m2 numbers; it must hold finite "
                                           r"floating-point numbers \(float16, bfloat16, float32 or float64\)"):
        load_concept(path, tiny_sd, class_word="dog")


# ------------------------------------------------------------------------------ what a concept may be

def test_a_token_of_the_limits_length_loads_and_one_longer_is_refused_in_a_short_message(tiny_sd, tmp_path):
    fits, over = "<" + "t" * (MAX_WORD_CHARS - 2) + ">", "<" + "t" * 99_998 + ">"
    for token in (fits, over):
        save_file({token: torch.zeros(1, WIDTH)}, str(tmp_path / f"{len(token)}.safetensors"))
    assert load_concept(tmp_path / f"{len(fits)}.safetensors", tiny_sd, class_word="dog").token == fits
    for source, token in ((tmp_path / "100000.safetensors", None), (tmp_path / f"{len(fits)}.safetensors", over)):
        with pytest.raises(ConceptError) as e:
            load_concept(source, tiny_sd, class_word="dog", token=token)
        assert str(e.value).endswith(f"is 100000 characters; the limit is {MAX_WORD_CHARS}")
        assert len(str(e.value)) < 120  # the token is not echoed whole


def test_an_embedding_far_longer_than_the_models_own_is_refused_and_a_learned_one_loads(tiny_sd, tmp_path):
    largest = largest_token_norm(tiny_sd)
    direction = torch.randn(1, WIDTH)
    direction /= direction.norm()
    for ratio in (0.5, 30, MAX_NORM_RATIO * 0.99):  # the tests' random embeddings are about 30 times
        save_file({"<toy>": direction * ratio * largest}, str(tmp_path / "fits.safetensors"))
        assert load_concept(tmp_path / "fits.safetensors", tiny_sd, class_word="dog").n_vectors == 1
    save_file({"<toy>": direction * MAX_NORM_RATIO * 1.01 * largest}, str(tmp_path / "far.safetensors"))
    with pytest.raises(ConceptError, match=f"over {MAX_NORM_RATIO} times that of tiny-sd's longest token embedding"):
        load_concept(tmp_path / "far.safetensors", tiny_sd, class_word="dog")


def test_every_vector_of_a_multi_vector_embedding_is_measured(tiny_sd, tmp_path):
    vectors = torch.zeros(4, WIDTH)
    vectors[3, 0] = 2 * MAX_NORM_RATIO * largest_token_norm(tiny_sd)
    save_file({"<toy>": vectors}, str(tmp_path / "e.safetensors"))
    with pytest.raises(ConceptError, match="has norm"):
        load_concept(tmp_path / "e.safetensors", tiny_sd, class_word="dog")


# ------------------------------------------------------------------------------ the token table

@pytest.fixture
def plans(monkeypatch, clip) -> list:
    """Swap plans the token view builds (through the model's family); the test fails past 100 (one per
    swap line would be 20,000)."""
    made = []
    real = clip.family.swap_plan

    def plan(*args, **kwargs):
        made.append(1)
        if len(made) > 100:
            pytest.fail("the token view plans every swap line of a flood")
        return real(*args, **kwargs)

    monkeypatch.setattr(clip.family, "swap_plan", plan)
    return made


def test_the_token_view_refuses_20000_swap_lines_before_planning_any(clip, plans):
    view = app.token_view(clip, app.SWAP, "a red circle on a blue background", None, "\n".join(["red=yellow"] * 20_000))
    assert view.problem == "there are 20000 swaps; the limit is 75"
    assert view.p is not None and view.source is None and not plans  # the prompt is still shown
    assert app.positions_picked(clip, app.SWAP, "a red circle", "\n".join(["red=yellow"] * 20_000), [2]) == \
        app.gr.update()


def test_the_token_view_of_a_100000_character_prompt_says_the_limit(clip):
    view = app.token_view(clip, app.SWAP, "a red circle " * 7_700, None, "")
    assert view.p is None and view.problem == "the prompt is 100100 characters; the limit is 4000"
    assert app.token_view(clip, app.SWAP, "  ", None, "").problem == ""  # an empty box is not a problem


# ------------------------------------------------------------------------------ memory and per-visitor state

@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc")
def test_release_memory_gives_freed_heap_pages_back_to_the_system():
    def rss_mib() -> float:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024

    blocks = [bytes(1000) for _ in range(200_000)]  # 200 MB in malloc'd blocks (over Python's small-object size)
    kept = blocks[::100]  # one block in a hundred stays alive, so the heap cannot shrink from its top
    del blocks
    before = rss_mib()
    if not release_memory():
        pytest.skip("this C library has no malloc_trim")
    assert before - rss_mib() > 100, "the freed blocks stayed resident"
    assert len(kept) == 2_000


ARENAS = """
import ctypes, sys, tempfile, threading
from alignit_core.memory import limit_arenas
if sys.argv[1] == "limited":
    assert limit_arenas(2)
together = threading.Barrier(8)
def work():  # eight threads holding memory at the same time
    blocks = [bytes(1000) for _ in range(2000)]
    together.wait()
threads = [threading.Thread(target=work) for _ in range(8)]
[t.start() for t in threads]; [t.join() for t in threads]
libc = ctypes.CDLL("libc.so.6")
libc.fopen.restype = ctypes.c_void_p
with tempfile.NamedTemporaryFile(suffix=".xml") as f:
    stream = libc.fopen(f.name.encode(), b"w")
    libc.malloc_info(0, ctypes.c_void_p(stream))
    libc.fclose(ctypes.c_void_p(stream))
    print(open(f.name).read().count("<heap nr="))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="glibc on Linux")
def test_limited_arenas_hold_the_memory_of_many_threads_in_two():
    def arenas(mode: str) -> int:
        done = subprocess.run([sys.executable, "-c", ARENAS, mode], capture_output=True, text=True, cwd=REPO)
        assert done.returncode == 0, done.stderr
        return int(done.stdout)

    assert arenas("limited") <= 2 and arenas("default") >= 4


def test_the_app_releases_memory_after_each_generation_score_and_upload(tiny_sd, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(app, "release_memory", lambda: calls.append(1))
    quiet = dict(progress=lambda *a, **k: None)
    *_, gen, _, _ = app.generate(tiny_sd, {}, {}, app.SWAP, None, "a jumping dog", [], "dog=zebra", 1, 2, 7.5, 64,
                                 "ddim", False, 0.0, 1.0, None, False, "overlay", **quiet)
    assert calls == [1]
    app.score(tiny_sd, None, "CLIP is not available", {}, gen, "overlay", **quiet)
    assert calls == [1, 1]
    path = header_only(tmp_path / "learned_embeds.safetensors", empty(MAX_TENSORS + 1))
    with pytest.raises(app.gr.Error, match="a concept file holds at most"):
        app.add_concept(tiny_sd, {}, {}, str(path), "", "dog")
    assert calls == [1, 1, 1]  # a refused upload too


def test_generating_with_an_upload_that_has_expired_says_so(tiny_sd):
    with pytest.raises(app.gr.Error) as caught:
        app.generate(tiny_sd, {}, {}, app.ALIGNIT, "uploaded:<toy>", "a photo of a <toy>", [], "", 1, 2, 7.5, 64,
                     "ddim", False, 0.0, 1.0, None, False, "overlay", progress=lambda *a, **k: None)
    assert html.unescape(caught.value.message) == ("the uploaded concept <toy> is no longer kept (uploads are kept "
                                                   "for 30 minutes); upload it again")  # the toast shows it as written


# ------------------------------------------------------------------------------ LoRA files

LAYER = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"  # tiny SD: (16, 32)


def lora_pair(rank: int = 4, up_scale: float = 0.01) -> dict:
    return {f"{LAYER}.lora_down.weight": torch.ones(rank, WIDTH) * 0.01,
            f"{LAYER}.lora_up.weight": torch.ones(16, rank) * up_scale}


def lora_entries(count: int, entry: dict | None = None) -> dict:
    """`count` LoRA-named header entries (down weights of layers that need not exist)."""
    entry = entry or {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
    return {f"lora_unet_layer_{i}.lora_down.weight": entry for i in range(count)}


@pytest.mark.parametrize("entries, words", [
    (lora_entries(700_000), r"its header is \d+\.\d MiB; the limit is 1 MiB \(4 MiB for a LoRA\)"),
    (lora_entries(MAX_LORA_TENSORS + 1), f"holds {MAX_LORA_TENSORS + 1} tensors; a LoRA file holds at most "
                                         f"{MAX_LORA_TENSORS}"),
    ({f"{LAYER}.lora_down.weight": {"dtype": "F8_E4M3", "shape": [4, WIDTH], "data_offsets": [0, 4 * WIDTH]}},
     "holds F8_E4M3 numbers, which concepts cannot use"),
    ({f"{LAYER}.lora_down.weight": {"dtype": "F32", "shape": [1] * 100_000, "data_offsets": [0, 4]}},
     "has 100000 dimensions; a concept's tensors have at most 4"),
    ({f"{LAYER}.lora_down.weight": {"dtype": "F32", "shape": [4, WIDTH], "data_offsets": [0, 4]}},
     "does not match its data"),
], ids=["700,000 tensors", "one over the limit", "float8", "100,000 dimensions", "sizes that do not add up"])
def test_a_lora_file_is_judged_by_its_header_before_the_lora_reader_opens_it(entries, words, tiny_sd, tmp_path,
                                                                             lora_never_opened):
    path = header_only(tmp_path / "lora.safetensors", entries)
    with pytest.raises(ConceptError, match=words):
        load_concept(path, tiny_sd, token="sks", class_word="dog")
    with pytest.raises(app.gr.Error, match=words):
        app.add_concept(tiny_sd, {}, {}, str(path), "sks", "dog")


def test_a_lora_named_by_its_manifest_is_judged_by_its_header_first(tiny_sd, tmp_path, lora_never_opened):
    header_only(tmp_path / "lora.safetensors", lora_entries(MAX_LORA_TENSORS + 1))
    (tmp_path / "manifest.json").write_text(json.dumps({"kind": "lora", "lora": "lora.safetensors", "token": "sks",
                                                        "class_word": "dog"}))
    with pytest.raises(ConceptError, match=f"a LoRA file holds at most {MAX_LORA_TENSORS}"):
        load_concept(tmp_path, tiny_sd)


def test_an_embedding_is_capped_at_1_mib_and_a_lora_may_be_larger(tiny_sd, tmp_path, monkeypatch):
    big = tmp_path / "learned_embeds.safetensors"
    save_file({"<toy>": torch.zeros(20_000, WIDTH)}, str(big))  # 2.4 MiB
    monkeypatch.setattr(concept_files, "load_file", lambda *a, **k: pytest.fail("the embedding was loaded"))
    with pytest.raises(app.gr.Error, match=r"textual-inversion file learned_embeds.safetensors is 2.4 MiB; "
                                           r"the limit is 1 MiB"):
        app.add_concept(tiny_sd, {}, {}, str(big), "", "dog")
    monkeypatch.undo()
    # a LoRA whose training metadata alone is 1.5 MB: its header and its file are past an embedding's limits
    lora = tmp_path / "sks.safetensors"
    save_file(lora_pair(), str(lora), metadata={"ss_training_comment": "x" * 1_500_000})
    assert lora.stat().st_size > 2**20
    uploaded, *_ = app.add_concept(tiny_sd, {}, {}, str(lora), "sks", "dog")
    assert uploaded["uploaded:sks"].kind == "lora"


@pytest.mark.parametrize("tensors, words", [
    (lora_pair(up_scale=1e30), r"have norm [\d.]+e\+\d+, over 100 times that of tiny-sd's own"),
    ({**lora_pair(), f"{LAYER}.alpha": torch.tensor(math.nan)}, "have norm nan"),
    ({**lora_pair(), f"{LAYER}.alpha": torch.zeros(0)}, "holds 0 numbers; an alpha is one number"),
    (lora_pair(rank=17), "the LoRA's rank for down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k is 17; "
                         "the layer takes at most 16"),
], ids=["an update of norm 1e30", "alpha NaN", "an empty alpha", "a rank past the layer's"])
def test_a_lora_far_outside_the_layer_it_changes_is_refused(tensors, words, tiny_sd, tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(ConceptError, match=words):
        load_concept(path, tiny_sd, token="sks", class_word="dog")


def test_a_custom_diffusion_query_or_output_far_outside_the_models_is_refused(tiny_sd, tmp_path):
    layer, attn = next(iter(tiny_sd.cross_attention_layers.items()))
    state = {f"{layer}.processor.{name}_custom_diffusion.weight": attn.get_submodule(name).weight.detach().clone()
             for name in ("to_k", "to_v")}
    state[f"{layer}.processor.to_q_custom_diffusion.weight"] = attn.to_q.weight.detach() * 1e30
    save_file(state, str(tmp_path / "cd.safetensors"))
    save_file({"<new1>": torch.randn(1, WIDTH)}, str(tmp_path / "e.safetensors"))
    (tmp_path / "manifest.json").write_text(json.dumps({
        "token": "<new1>", "class_word": "dog", "kind": "custom_diffusion", "weights": "e.safetensors",
        "custom_diffusion": "cd.safetensors"}))
    with pytest.raises(ConceptError, match=f"the Custom Diffusion weights for {layer}.to_q have norm"):
        load_concept(tmp_path, tiny_sd)


def test_diffusers_alpha_pattern_names_modules_and_a_regular_expression_there_is_refused_unrun(tiny_sd, tmp_path):
    layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    tensors = {f"unet.{layer}.lora_A.weight": torch.ones(4, WIDTH) * 0.01,
               f"unet.{layer}.lora_B.weight": torch.ones(16, 4) * 0.01}

    def scale(config: dict) -> float:
        path = tmp_path / "lora.safetensors"
        save_file(tensors, str(path), metadata={"lora_adapter_metadata": json.dumps(config)})
        return load_concept(path, tiny_sd, token="sks", class_word="dog").unet[layer].scale

    assert scale({"unet.lora_alpha": 8, "unet.alpha_pattern": {layer: 2, "attn1.to_k": 3}}) == 2 / 4
    for config, words in (({"unet.alpha_pattern": {"(.*.*)*x": 2}}, r"the LoRA's alpha pattern '\(\.\*\.\*\)\*x' "
                                                                     r"is a regular expression"),
                          ({"unet.lora_alpha": "8"}, "the LoRA's alpha for .* is '8', not a number"),
                          ([1, 2], "lora_adapter_metadata is not a valid adapter configuration")):
        with pytest.raises(ConceptError, match=words):
            scale(config)


def test_uploaded_loras_held_for_all_visitors_are_capped_and_an_expired_one_frees_its_share(tiny_sd, tmp_path,
                                                                                          monkeypatch):
    import gc

    path = tmp_path / "sks.safetensors"
    save_file(lora_pair(), str(path))
    size = path.stat().st_size
    monkeypatch.setattr(app, "LORA_UPLOADS", app.LoRAUploads(2 * size))
    first, *_ = app.add_concept(tiny_sd, {}, {}, str(path), "sks", "dog")  # one visitor
    second, *_ = app.add_concept(tiny_sd, {}, {}, str(path), "sks", "dog")  # another
    with pytest.raises(app.gr.Error, match=r"already keeps 0 MB of uploaded LoRAs .* would pass the limit"):
        app.add_concept(tiny_sd, {}, {}, str(path), "sks", "dog")
    embedding = tmp_path / "learned_embeds.safetensors"  # embeddings are not counted
    save_file({"<toy>": torch.zeros(1, WIDTH)}, str(embedding))
    assert app.add_concept(tiny_sd, {}, {}, str(embedding), "", "dog")[0]
    del first  # the first visitor's session expired
    gc.collect()
    assert app.add_concept(tiny_sd, {}, {}, str(path), "sks", "dog")[0]["uploaded:sks"].kind == "lora"
    assert second


# ------------------------------------------------------------------------------ several concepts, the knobs

@pytest.fixture
def two_concepts(tiny_sd, tmp_path) -> list:
    for token in ("<toy>", "<pet>"):
        save_file({token: torch.randn(1, WIDTH)}, str(tmp_path / f"{token[1:-1]}.safetensors"))
    return [load_concept(tmp_path / "toy.safetensors", tiny_sd, class_word="dog"),
            load_concept(tmp_path / "pet.safetensors", tiny_sd, class_word="cat")]


def test_two_concepts_in_a_100000_character_prompt_are_refused_by_its_length(tiny_sd, two_concepts):
    prompt = ("a <toy> and a <pet> " * 5_000)[:100_000]
    with pytest.raises(PromptError, match="the prompt is 100000 characters; the limit is 4000"):
        generate_concept(tiny_sd, prompt, two_concepts, Settings(seed=1, steps=2))
    view = app.token_view(tiny_sd, app.ALIGNIT, prompt, two_concepts, "")
    assert view.p is None and view.problem == "the prompt is 100000 characters; the limit is 4000"
    registry = {"toy": two_concepts[0], "pet": two_concepts[1]}
    with pytest.raises(app.gr.Error, match="the limit is 4000"):
        app.generate(tiny_sd, registry, {}, app.ALIGNIT, "toy", prompt, [], "", 1, 2, 7.5, 64, "ddim", False, 0.0,
                     1.0, None, False, "overlay", second_concept="pet", progress=lambda *a, **k: None)


def test_an_expired_second_concept_says_so(tiny_sd, two_concepts):
    with pytest.raises(app.gr.Error) as caught:
        app.generate(tiny_sd, {"toy": two_concepts[0]}, {}, app.ALIGNIT, "toy", "a <toy> and a <pet>", [], "", 1, 2,
                     7.5, 64, "ddim", False, 0.0, 1.0, None, False, "overlay", second_concept="uploaded:<pet>",
                     progress=lambda *a, **k: None)
    assert "the uploaded concept <pet> is no longer kept" in html.unescape(caught.value.message)
