"""Long prompts (LongAlign segment encoding): every word kept, swaps on global positions."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from alignit_core import (Concept, ConceptWords, PromptError, Settings, SettingsError, concept_plan, generate_concept,
                          generate_swap, positions_plan, read_prompt, split_sentences, tokenize, word_swap_plan)
from alignit_core.conditioning import encode_prompt
from alignit_core.prompts import MAX_SEGMENT_ROWS, fit

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "pink", "white", "black", "gray", "brown", "cyan"]
# 12 sentences of 19 tokens: 228 tokens, several segments; each colour once
LONG = " ".join(f"Panel {i} shows a {c} square with {i}.5 thin stripes, a tiny dot and a frame around it."
                for i, c in enumerate(COLOURS))
FAST = Settings(seed=0, steps=2)


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _content_count(tokenizer, text: str) -> int:
    return sum(len(tokenize(tokenizer, w, limit=False).ids) - 2 for w in text.split())


# ------------------------------------------------------------------------------ splitting


def test_sentences_split_at_full_stops_but_not_abbreviations_initials_or_decimals():
    text = "Dr. Smith paints 3.5 cats, e.g. tabbies. J. R. Tolkien smiles! Is it blue? yes. the end"
    assert split_sentences(text) == ["Dr. Smith paints 3.5 cats, e.g. tabbies.", "J. R. Tolkien smiles!",
                                     "Is it blue?", "yes.", "the end"]


def test_a_200_token_prompt_keeps_every_word(tiny_sd):
    tok = tiny_sd.tokenizer
    assert _content_count(tok, LONG) >= 200
    p = read_prompt(tok, LONG)
    assert len(p.parts) >= 3
    assert len(p.content) == _content_count(tok, LONG)  # no token lost
    words = LONG.split()
    for i, word in enumerate(words):  # each word's tokens, in order, spell the word
        pieces = [t.text for t in p.tokens if t.word_index == i]
        assert "".join(pieces) == word.lower(), (i, word, pieces)
    assert all(len(part.ids) - 2 <= 75 for part in p.parts)
    assert [t.position for t in p.tokens] == list(range(len(p.ids)))
    assert len(p.ids) <= MAX_SEGMENT_ROWS


def test_a_sentence_over_75_tokens_splits_at_commas_then_between_words(tiny_sd):
    tok = tiny_sd.tokenizer
    clauses = ", ".join(f"a {c} dot beside a {c} ring" for c in COLOURS)  # one sentence, 12 clauses
    texts, _ = fit(tok, clauses, "segments")
    assert len(texts) >= 2 and all(t.endswith(",") for t in texts[:-1])
    no_commas = " ".join(["dot"] * 160)
    texts, _ = fit(tok, no_commas, "segments")
    assert [_content_count(tok, t) for t in texts] == [75, 75, 10]


def test_a_prompt_beyond_the_segment_limit_is_refused(tiny_sd):
    with pytest.raises(PromptError, match="segment mode reads at most"):
        read_prompt(tiny_sd.tokenizer, " ".join(["dot."] * 200))


# ------------------------------------------------------------------------------ modes


def test_refuse_mode_refuses_and_truncate_mode_drops_words_with_a_warning(tiny_sd):
    with pytest.raises(PromptError, match="reads at most 75"):
        generate_swap(tiny_sd, LONG, [("red", "blue")], Settings(steps=1, long_prompt="refuse"))
    with pytest.raises(SettingsError, match="long-prompt mode"):
        generate_swap(tiny_sd, "a red dot", [("red", "blue")], Settings(steps=1, long_prompt="chunks"))
    gen = generate_swap(tiny_sd, LONG, [("red", "blue")], Settings(seed=0, steps=2, long_prompt="truncate"))
    assert len(gen.warnings) == 1 and "dropped" in gen.warnings[0]
    kept = gen.record()["p"]
    assert _content_count(tiny_sd.tokenizer, kept) <= 75 and LONG.startswith(kept)
    assert gen.record()["dropped"] == LONG[len(kept):].strip()
    assert gen.record()["warnings"] == gen.warnings
    alone = generate_swap(tiny_sd, kept, [("red", "blue")], Settings(seed=0, steps=2))
    assert np.array_equal(_pixels(gen.images["swapped"]), _pixels(alone.images["swapped"]))
    with pytest.raises(PromptError, match="the word 'cyan' was cut off"):  # cyan sits in the dropped tail
        generate_swap(tiny_sd, LONG, [("cyan", "blue")], Settings(steps=1, long_prompt="truncate"))


def test_short_prompts_take_the_normal_path_byte_for_byte(tiny_sd):
    text = "a red circle on a blue background"
    tok = tiny_sd.tokenizer
    assert read_prompt(tok, text) == tokenize(tok, text)
    for mode in ("segments", "truncate"):
        assert word_swap_plan(tok, text, [("red", "green")], mode) == word_swap_plan(tok, text, [("red", "green")],
                                                                                       "refuse")
    widths = set()

    def on_kv(layer, step, key, value):
        widths.add(key.shape[1])

    a = generate_swap(tiny_sd, text, [("red", "green")], FAST, on_kv=on_kv)
    b = generate_swap(tiny_sd, text, [("red", "green")], Settings(seed=0, steps=2, long_prompt="refuse"))
    assert widths == {77}
    assert a.images["swapped"].tobytes() == b.images["swapped"].tobytes()
    assert np.array_equal(a.maps["swapped"], b.maps["swapped"])
    assert "segments" not in a.record() and a.warnings == []


# ------------------------------------------------------------------------------ encoding


@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_sdxl"])
def test_token_table_positions_are_the_rows_of_the_conditioning(fixture, request):
    model = request.getfixturevalue(fixture)
    p = read_prompt(model.tokenizer, LONG)
    hidden, pooled = encode_prompt(model, p, None)
    assert hidden.shape[0] == len(p.ids) == len(p.tokens)
    for k, part in enumerate(p.parts):
        alone, part_pooled = encode_prompt(model, part, None)
        start = p.starts[k]
        assert p.tokens[start].text == model.tokenizer.bos_token
        for local in range(len(part.ids) - 1):  # start + content rows; the end token is dropped
            assert p.tokens[start + local].text == part.tokens[local].text
            assert torch.equal(hidden[start + local], alone[local])
        if k == 0 and model.family.pooled:
            assert torch.equal(pooled, part_pooled)


@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_sdxl"])
def test_identity_swap_on_a_long_prompt_is_bit_exact(fixture, request):
    model = request.getfixturevalue(fixture)
    p = read_prompt(model.tokenizer, LONG)
    picks = [p.content[3], p.content[len(p.content) // 2], p.content[-1]]
    gen = generate_swap(model, LONG, plan=positions_plan(p, p, picks), settings=FAST)
    assert np.array_equal(_pixels(gen.images["baseline"]), _pixels(gen.images["swapped"]))
    assert np.array_equal(gen.maps["baseline"], gen.maps["swapped"])
    assert gen.maps["swapped"].shape[0] == len(p.ids)
    assert gen.record()["segments"] == [part.text for part in p.parts]


def test_a_swap_in_the_third_segment_changes_only_its_rows(tiny_sd):
    tok = tiny_sd.tokenizer
    plan = word_swap_plan(tok, LONG, [("pink", "zebra")])
    p = plan.target
    (pos,) = plan.positions
    assert p.locate(pos)[0] == 2 and p.tokens[pos].text == "pink"
    assert plan.source.tokens[pos].text == "zebra" and len(plan.source.ids) == len(p.ids)
    assert plan.source.starts == p.starts
    seen = {}

    def on_kv(layer, step, key, value):
        seen[(layer, step)] = (key.clone(), value.clone())

    gen = generate_swap(tiny_sd, LONG, [("pink", "zebra")], FAST, on_kv=on_kv)
    assert set(layer for layer, _ in seen) == set(tiny_sd.cross_attention_layers)
    for (layer, step), (key, value) in seen.items():
        assert key.shape[1] == 77 * -(-len(p.ids) // 77)  # padded to a multiple of 77
        for t in (key, value):  # [uncond baseline, uncond swapped, cond baseline, cond swapped]
            assert (t[3] != t[2]).any(dim=-1).nonzero().flatten().tolist() == [pos], (layer, step)
            assert not (t[1] != t[0]).any()
    # the swapped rows are the third segment's p' rows, encoded on their own
    src, _ = encode_prompt(tiny_sd, plan.source.parts[2], None)
    attn = next(iter(tiny_sd.cross_attention_layers.values()))
    name = next(iter(tiny_sd.cross_attention_layers))
    local = pos - p.starts[2]
    torch.testing.assert_close(seen[(name, 0)][0][3, pos], attn.to_k(src)[local], rtol=0, atol=1e-6)
    assert not np.array_equal(_pixels(gen.images["baseline"]), _pixels(gen.images["swapped"]))


def test_swap_targets_are_found_across_segments_and_checked_on_global_positions(tiny_sd):
    tok = tiny_sd.tokenizer
    p = read_prompt(tok, LONG)
    with pytest.raises(PromptError, match="occurs 12 times"):
        word_swap_plan(tok, LONG, [("square", "circle")])
    with pytest.raises(PromptError, match="start token of segment 2"):
        word_swap_plan(tok, LONG, [(p.starts[1], "circle")])
    with pytest.raises(PromptError, match=f"positions 1..{len(p.ids) - 1}"):
        word_swap_plan(tok, LONG, [(len(p.ids), "circle")])
    last = p.content[-1]
    plan = word_swap_plan(tok, LONG, [(last, "circle"), ("red", "blue")])
    red = next(t.position for t in p.tokens if t.text == "red")
    assert plan.positions == (red, last)
    assert plan.source.tokens[last].text == "circle" and plan.source.tokens[red].text == "blue"


def test_long_concept_prompt_puts_the_concept_rows_in_its_segment(tiny_sd):
    tok = tiny_sd.tokenizer
    text = LONG.replace("a purple square", "a <toy>")
    cp = concept_plan(tok, text, ConceptWords("<toy>", "square", "{token}", 2))
    p, source, custom = cp.plan.target, cp.plan.source, cp.customized
    assert len(p.parts) >= 3 and len(custom.parts) == len(p.parts) and len(source.ids) == len(p.ids)
    (pos,) = cp.plan.positions
    assert p.tokens[pos].text == "square" and source.vectors == {pos - 1: 0, pos: 1}  # right alignment
    assert sorted(custom.vectors.values()) == [0, 1]
    seg = p.locate(pos)[0]
    assert all(t.text == "*" for k, part in enumerate(source.parts) if k != seg for t in part.tokens[1:-1])
    concept = Concept("toy", "<toy>", "square", "textual_inversion", vectors=(torch.randn(2, 32),))
    gen = generate_concept(tiny_sd, text, concept, FAST, include_base=True)
    assert gen.swapped["alignit"] == (pos,)
    assert not np.array_equal(_pixels(gen.images["alignit"]), _pixels(gen.images["base"]))
    with pytest.raises(PromptError, match="beyond the 75 tokens"):
        concept_plan(tok, LONG.replace("a cyan square", "a <toy>"), ConceptWords("<toy>", "square", "{token}", 2), "truncate")
