"""Properties of p, p' and the swapped positions over random prompts, swaps, concepts and position
lists, on the real CLIP BPE tokenizer: a plan is always consistent, or a clear AlignITError says
why not; never an IndexError or a plan that swaps the wrong rows.

Consistent means: p is the prompt as the model reads it; p' has p's length and segments and
tokenizes back to itself; every swapped position is a content token of p (not a start or end
token); p' holds `*` everywhere but the rows it supplies; and a concept's vectors sit, in order,
on the rows that p' supplies, ending on the class word's last token.
"""
from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignit_core import AlignITError, ConceptWords, concept_plan, read_prompt, tokenize, word_swap_plan
from alignit_core.prompts import STAR, SwapPlan, check_positions, positions_plan

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

WORDS = (
    "a an the of on in with and dog cat zebra banana plate photo jumping sleeping small big "
    "red green blue yellow white black pink purple orange circle square triangle star background "
    "hippopotamus teddy bear astronaut sofa garden ball toy painting "
    "dog, cat. plate! star? (red) \"blue\" zebra-like 3.5 42 1,000 2nd Dr. e.g. U.S. "
    "café naïve 日本 über 🙂 ÷ -- ... ; :"
).split()
SOURCES = [w for w in WORDS if w.isalpha()] + ["sea lion", "x"]
CLASS_WORDS = ["dog", "cat", "ball", "hippopotamus", "teddy", "circle", "toy", "astronaut"]
TOKENS = ["<toy>", "<cat-toy>", "<new1>", "<x>", "<striped-ball>"]  # one word each, as load_concept requires


@pytest.fixture(scope="module")
def tok():
    from alignit_core.testing import clip_tokenizer

    return clip_tokenizer()


short = st.lists(st.sampled_from(WORDS), min_size=1, max_size=20)
long = st.lists(st.sampled_from(WORDS), min_size=60, max_size=140)  # over 75 tokens: segments
prompt_words = st.one_of(short, short, long)
long_mode = st.sampled_from(["segments", "segments", "truncate", "refuse"])


def _parts(prompt):
    return prompt.parts or (prompt,)


def check_common(tok, plan: SwapPlan, vector_token: str | None, n_vectors: int) -> list[int]:
    """Check what every plan promises; return the rows p' supplies (its content rows that are not `*`)."""
    p, src = plan.target, plan.source
    assert len(p.ids) == len(src.ids) == len(p.tokens) == len(src.tokens)
    assert [t.position for t in p.tokens] == list(range(len(p.ids)))
    assert p.starts == src.starts and [len(a.ids) for a in _parts(p)] == [len(b.ids) for b in _parts(src)]
    positions = list(plan.positions)
    assert positions and positions == sorted(set(positions))
    assert set(positions) <= set(p.content), "a swapped position is a start or end token"
    for part in _parts(src):  # p' tokenizes back to itself, segment by segment
        again = tokenize(tok, part.text, vector_token, n_vectors)
        assert again.ids == part.ids and again.vectors == part.vectors
    star = tok.convert_tokens_to_ids(STAR + "</w>")
    supplied = [i for i in src.content if src.ids[i] != star or i in src.vectors]
    return supplied


@st.composite
def swaps_in(draw, words: list[str]) -> list[tuple[str | int, str]]:
    """One to three swaps whose targets are mostly the prompt's own words (preferably ones it holds
    once) or positions."""
    once = [w for w in words if words.count(w) == 1] or words
    target = st.one_of(st.sampled_from(once), st.integers(-3, 2 * len(words) + 3), st.sampled_from(WORDS))
    return draw(st.lists(st.tuples(target, st.sampled_from(SOURCES)), min_size=1, max_size=3))


@given(data=st.data(), words=prompt_words, long_prompt=long_mode)
@SETTINGS
def test_word_swaps_give_a_consistent_plan_or_a_clear_error(tok, data, words, long_prompt):
    text = " ".join(words)
    swaps = data.draw(swaps_in(words))
    try:
        plan = word_swap_plan(tok, text, swaps, long_prompt)
    except AlignITError:
        return
    assert plan.target.ids == read_prompt(tok, text, long_prompt).ids  # p is what the model reads
    supplied = check_common(tok, plan, None, 0)
    assert supplied == list(plan.positions), "p' supplies rows that are not swapped, or misses some"
    # p' holds exactly the source words' tokens on the swapped rows
    given_ids = Counter(i for _, source in swaps for i in tokenize(tok, source).ids[1:-1])
    assert Counter(plan.source.ids[i] for i in supplied) == given_ids


@given(words=prompt_words, at=st.integers(0, 200), glue=st.sampled_from(["", "", "", "", "(", "x"]),
       tail=st.sampled_from(["", "", "", ",", ".", "'s", "s"]), token=st.sampled_from(TOKENS),
       class_word=st.sampled_from(CLASS_WORDS), n_vectors=st.integers(0, 4),
       phrase=st.sampled_from(["{token}", "{token}", "{token} {class_word}"]), long_prompt=long_mode)
@SETTINGS
def test_concept_plans_are_consistent_or_a_clear_error(tok, words, at, glue, tail, token, class_word, n_vectors,
                                                       phrase, long_prompt):
    words = list(words)
    words.insert(at % (len(words) + 1), f"{glue}{token}{tail}")
    text = " ".join(words)
    try:
        cp = concept_plan(tok, text, ConceptWords(token, class_word, phrase, n_vectors), long_prompt)
    except AlignITError:
        return
    plan, vtok = cp.plan, (token if n_vectors else None)
    supplied = check_common(tok, plan, vtok, n_vectors)
    positions = list(plan.positions)
    # p' supplies one contiguous run of rows (the concept phrase), ending on the last swapped row
    assert supplied == list(range(supplied[0], supplied[-1] + 1)) and supplied[-1] == positions[-1]
    assert set(positions) <= set(supplied)
    # in p, the swapped rows are tokens of the word that took the concept's place (a suffix may merge
    # with the class word: `<toy>s` reads as `dogs`), and they end on that word's last class-word token
    p = plan.target
    assert all(class_word in p.tokens[i].word for i in positions), [p.tokens[i] for i in positions]
    if n_vectors:
        # the concept's vectors, in order, on consecutive rows of p' and of the customized prompt
        for prompt in (plan.source, cp.customized):
            rows = sorted(prompt.vectors)
            assert [prompt.vectors[r] for r in rows] == list(range(n_vectors))
            assert rows == list(range(rows[0], rows[0] + n_vectors))
        if phrase == "{token}":
            assert set(positions) <= set(plan.source.vectors)  # every swapped row is a concept vector


@given(words=prompt_words,
       picks=st.lists(st.one_of(st.integers(-5, 400), st.sampled_from(["x", "", "2.5", " 3", "+4", "1e1", None])),
                      max_size=6))
@SETTINGS
def test_chosen_positions_are_valid_or_a_clear_error(tok, words, picks):
    p = read_prompt(tok, " ".join(words))
    try:
        plan = positions_plan(p, p, picks)
    except AlignITError:
        return
    assert list(plan.positions) == sorted(int(x) for x in picks)
    assert len(set(plan.positions)) == len(picks) and set(plan.positions) <= set(p.content)
    assert check_positions(p, list(plan.positions)) == plan.positions
