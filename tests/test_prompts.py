"""Token positions, p and p' (alignment of concepts and swaps), on the real CLIP BPE tokenizer."""
from __future__ import annotations

import pytest

from alignit_core import ConceptWords, PromptError, concept_plan, parse_swap, tokenize, word_swap_plan
from alignit_core.prompts import check_positions, positions_plan


@pytest.fixture(scope="module")
def tok():
    from alignit_core.testing import clip_tokenizer

    return clip_tokenizer()


def test_positions_match_stable_diffusion(tok):
    p = tokenize(tok, "a photo of a cat")
    assert p.ids == (49406, 320, 1125, 539, 320, 2368, 49407)
    assert [t.text for t in p.tokens] == ["<|startoftext|>", "a", "photo", "of", "a", "cat", "<|endoftext|>"]
    assert [t.position for t in p.tokens] == list(range(7))


def test_word_by_word_tokenization_equals_the_tokenizers_own(tok):
    text = "A banana, in a white plate!! on 3.5 tables; zebra-like cats"
    assert tokenize(tok, text).ids == tuple(tok(text).input_ids)


def test_tokens_know_their_words(tok):
    p = tokenize(tok, "a jumping dog, fast")
    assert [(t.text, t.word) for t in p.tokens[1:-1]] == [("a", "a"), ("jumping", "jumping"), ("dog", "dog,"),
                                                          (",", "dog,"), ("fast", "fast")]


def test_dog_zebra_dummy_prompt_puts_zebra_where_dog_was(tok):
    plan = word_swap_plan(tok, "a jumping dog", [("dog", "zebra")])
    assert plan.source.text == "* * zebra"
    assert plan.positions == (3,)
    assert len(plan.source.ids) == len(plan.target.ids)


def test_banana_plate_swap_by_position(tok):
    plan = word_swap_plan(tok, "banana in a white plate", [(4, "black")])
    assert plan.target.tokens[4].text == "white"
    assert plan.source.text == "* * * black *"
    assert plan.positions == (4,)


def test_multi_vector_concept_spills_before_a_shorter_class_word(tok):
    cp = concept_plan(tok, "a photo of a <cat-toy> in a garden", ConceptWords("<cat-toy>", "cat", "{token}", 3))
    assert [t.text for t in cp.customized.tokens[5:8]] == ["<cat-toy>", "<cat-toy>_1", "<cat-toy>_2"]
    assert cp.customized.vectors == {5: 0, 6: 1, 7: 2}
    assert cp.plan.target.text == "a photo of a cat in a garden"
    # right alignment: the last concept vector lands on "cat" (position 5); two spill before it
    assert cp.plan.source.vectors == {3: 0, 4: 1, 5: 2}
    assert cp.plan.positions == (5,)
    assert cp.plan.unstarred() == (3, 4, 5)  # every row where p' holds the concept
    assert len(cp.plan.source.ids) == len(cp.plan.target.ids)


def test_class_word_longer_than_the_concept_swaps_its_last_token(tok):
    cp = concept_plan(tok, "a <sks> on the sofa", ConceptWords("<sks>", "teddy bear", "{token}", 1))
    assert cp.plan.target.text == "a teddy bear on the sofa"
    assert cp.plan.target.tokens[3].text == "bear"
    assert cp.plan.source.vectors == {3: 0}
    assert cp.plan.positions == (3,)


def test_custom_diffusion_phrase_puts_modifier_before_the_class_word(tok):
    cp = concept_plan(tok, "a <new1> on a green background", ConceptWords("<new1>", "circle", "{token} {class_word}", 1))
    assert cp.customized.text == "a <new1> circle on a green background"
    assert cp.plan.target.text == "a circle on a green background"
    assert cp.plan.source.text == "<new1> circle * * * *"
    assert cp.plan.positions == (2,)
    # the modifier's row lands on the `a` before the class word: AlignIT leaves it as p's, `unstarred` names it
    assert cp.plan.unstarred() == (1, 2)
    cp = concept_plan(tok, "a photo of a <new1> on a green background", ConceptWords("<new1>", "circle", "{token} {class_word}", 1))
    assert (cp.plan.positions, cp.plan.unstarred()) == ((5,), (4, 5))
    assert cp.plan.narrowed({5}).unstarred() == (4, 5)  # what p' holds, whichever rows are written
    assert word_swap_plan(tok, "a jumping dog", [("dog", "zebra")]).unstarred() == (3,)


def test_concept_at_the_very_start_cannot_spill_and_says_so(tok):
    with pytest.raises(PromptError, match="add a word before it"):
        concept_plan(tok, "<cat-toy> in a garden", ConceptWords("<cat-toy>", "cat", "{token}", 3))


@pytest.mark.parametrize("text,message", [
    ("a photo of a cat", "is not in the prompt"),
    ("a <sks> and a <sks>", "appears 2 times"),
])
def test_concept_token_must_appear_once(tok, text, message):
    with pytest.raises(PromptError, match=message):
        concept_plan(tok, text, ConceptWords("<sks>", "cat", "{token}", 1))


@pytest.mark.parametrize("positions,message", [
    ([0], "start token"), ([9], "outside"), ([-1], "outside"), ([2, 2], "twice"), (["x"], "not a whole number"),
    ([], "at least one"), (["2.5"], "not a whole number"),
])
def test_bad_positions_are_refused(tok, positions, message):
    p = tokenize(tok, "a jumping dog")
    with pytest.raises(PromptError, match=message):
        check_positions(p, positions)


def test_identity_plan_needs_same_length(tok):
    p = tokenize(tok, "a jumping dog")
    with pytest.raises(PromptError, match="positions"):
        positions_plan(p, tokenize(tok, "a dog"), [2])


@pytest.mark.parametrize("swap,message", [
    (("cat", "zebra"), "not in the prompt"),
    (("dog", "golden retriever"), "only 1"),
    ((0, "zebra"), "start token"),
    ((7, "zebra"), "outside"),
])
def test_bad_swaps_are_refused(tok, swap, message):
    with pytest.raises(PromptError, match=message):
        word_swap_plan(tok, "a jumping dog", [swap])


def test_repeated_target_word_asks_for_a_position(tok):
    with pytest.raises(PromptError, match="POS=SOURCE"):
        word_swap_plan(tok, "a dog and a dog", [("dog", "cat")])


def test_over_long_prompt_is_refused(tok):
    with pytest.raises(PromptError, match="at most 75"):
        tokenize(tok, "cat " * 76)


def test_parse_swap_shorthand():
    assert parse_swap("dog=zebra") == ("dog", "zebra")
    assert parse_swap(" 4 = black ") == (4, "black")
    with pytest.raises(PromptError):
        parse_swap("dog")
    with pytest.raises(PromptError):
        parse_swap("=zebra")


def test_text_encoder_concept_reads_its_token_as_words(tok):
    cp = concept_plan(tok, "a photo of a sks dog", ConceptWords("sks", "dog", "{token} {class_word}", 0))
    assert cp.customized.text == "a photo of a sks dog" and not cp.customized.vectors
    assert cp.plan.target.text == "a photo of a dog"
    assert cp.plan.source.text == "* * * sks dog"
    assert cp.plan.positions == (5,)


def test_a_swap_target_typed_with_punctuation_names_the_word(tok):
    plan = word_swap_plan(tok, "a cat. a dog", [("cat.", "zebra")])
    assert plan.positions == (2,) and plan.source.tokens[2].text == "zebra"


def test_a_swap_target_cut_by_truncation_is_called_cut_not_missing(tok):
    """In truncate mode a word past the 75 tokens was reported as 'not in the prompt'."""
    long = "a red circle on a blue background " + "with a thin frame " * 20 + "and a zebra"
    with pytest.raises(PromptError, match="the word 'zebra' was cut off: it lies beyond the 75 tokens"):
        word_swap_plan(tok, long, [("zebra", "dog")], "truncate")
    with pytest.raises(PromptError, match="the word 'cat' is not in the prompt"):
        word_swap_plan(tok, long, [("cat", "dog")], "truncate")
    assert word_swap_plan(tok, long, [("red", "dog")], "truncate").positions == (2,)
