"""A concept's prompts: the customized prompt (as the customization method reads it), p (the
concept replaced by its class word) and p' (`*` everywhere but the concept), with the positions
of p whose rows AlignIT takes from p'. Alignment rules are prompts.py's (right alignment).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .errors import PromptError
from .prompts import (Prompt, SwapPlan, dummy_prompt, fit, global_positions, join, max_tokens, stars, tokenize)


@dataclass(frozen=True)
class ConceptPrompts:
    customized: Prompt  # the prompt as the customization method reads it
    plan: SwapPlan  # p, p' and the swapped positions


def _concept_one(tokenizer, text: str, token: str, class_word: str, phrase: str,
                 n_vectors: int) -> ConceptPrompts:
    """concept_plan for a prompt of at most 75 tokens (one segment)."""
    expanded = phrase.format(token=token, class_word=class_word)
    already = phrase != "{token}" and expanded in text
    customized_text = text if already else text.replace(token, expanded)
    # a concept without vectors (a text-encoder fine-tune) reads its token as ordinary text
    vector_token = token if n_vectors else None
    customized = tokenize(tokenizer, customized_text, vector_token, n_vectors)
    p_text = customized_text.replace(expanded, class_word)
    p = tokenize(tokenizer, p_text)
    # the concept phrase's positions in the customized prompt
    before = tokenize(tokenizer, customized_text.split(expanded)[0].strip(), limit=False)
    c_start = len(before.ids) - 1
    c_len = len(tokenize(tokenizer, expanded, vector_token, n_vectors, limit=False).ids) - 2
    w_len = len(tokenize(tokenizer, class_word, limit=False).ids) - 2
    w_last = c_start + w_len - 1  # class word sits where the phrase starts in p
    start = w_last - c_len + 1
    if start < 1:
        raise PromptError(f"{token} needs {1 - start} more token(s) before it in the prompt to align "
                          f"with {class_word!r}; add a word before it (e.g. 'a {token}')")
    source = dummy_prompt(tokenizer, len(p.ids), [(start, customized, tuple(range(c_start, c_start + c_len)))],
                           vector_token, n_vectors)
    positions = tuple(range(max(start, c_start), w_last + 1))
    return ConceptPrompts(customized, SwapPlan(p, source, positions))




def concept_plan(tokenizer, text: str, words: ConceptWords, long: str = "segments") -> ConceptPrompts:
    """Build the customized prompt, p (concept phrase -> class word) and p' for a concept written
    as `words` (its token, class word, phrase such as "{token}" or "{token} {class_word}", vector
    count). Over 75 tokens, `long` decides: segments (the concept's segment gets the concept's p',
    the others all `*`), truncate (the concept token must survive) or refuse."""
    token, class_word, phrase, n_vectors = words.token, words.class_word, words.phrase, words.n_vectors
    count = text.count(token)
    if count == 0:
        raise PromptError(f"the concept token {token} is not in the prompt")
    if count > 1:
        raise PromptError(f"the concept token {token} appears {count} times; use it once")
    expanded = phrase.format(token=token, class_word=class_word)
    vector_token = token if n_vectors else None

    def tokens_of(word):  # the longer of the word as the customization and as p read it
        if token not in word:
            return len(tokenize(tokenizer, word, limit=False).ids) - 2
        return max(len(tokenize(tokenizer, word.replace(token, expanded), vector_token, n_vectors, limit=False).ids),
                   len(tokenize(tokenizer, word.replace(token, class_word), limit=False).ids)) - 2

    texts, dropped = fit(tokenizer, text, long, tokens_of)
    if len(texts) == 1:
        if token not in texts[0]:
            raise PromptError(f"the concept token {token} lies beyond the {max_tokens(tokenizer)} tokens this "
                              f"model reads; move it forward or use long-prompt mode 'segments'")
        one = _concept_one(tokenizer, texts[0], token, class_word, phrase, n_vectors)
        if not dropped:
            return one
        return ConceptPrompts(replace(one.customized, dropped=dropped),
                              replace(one.plan, target=replace(one.plan.target, dropped=dropped)))
    custom, ps, sources = [], [], []
    for k, t in enumerate(texts):
        if token in t:
            one = _concept_one(tokenizer, t, token, class_word, phrase, n_vectors)
            custom.append(one.customized)
            ps.append(one.plan.target)
            sources.append(one.plan.source)
            segment, local = k, one.plan.positions
        else:
            part = tokenize(tokenizer, t)
            custom.append(part)
            ps.append(part)
            sources.append(stars(tokenizer, part))
    p = join(ps, " ".join(x.text for x in ps))
    return ConceptPrompts(join(custom, " ".join(x.text for x in custom)),
                          SwapPlan(p, join(sources, " ".join(s.text for s in sources)), global_positions(p, segment, local)))


@dataclass(frozen=True)
class ConceptWords:
    """How a concept is written: its token, class word, phrase and vector count (0: plain text)."""

    token: str
    class_word: str
    phrase: str = "{token}"
    n_vectors: int = 0

    @property
    def expanded(self) -> str:
        return self.phrase.format(token=self.token, class_word=self.class_word)

    def as_class_word(self, text: str) -> str:
        """`text` with this concept (its phrase if written out, else its token) replaced by its class word."""
        if self.phrase != "{token}" and self.expanded in text:
            return text.replace(self.expanded, self.class_word)
        return text.replace(self.token, self.class_word)


@dataclass(frozen=True)
class SeveralConcepts:
    """Several concepts in one prompt: the prompt as one customized model with all of them reads it,
    and per concept its p' and positions (every plan has the same p)."""

    customized: Prompt  # concept vectors numbered on in the concepts' order
    plans: tuple[SwapPlan, ...]


def several_concepts_plan(tokenizer, text: str, concepts: list[ConceptWords]) -> SeveralConcepts:
    """p (every concept replaced by its class word) and, per concept, p' holding only that concept
    (`*` everywhere else, the other concepts' class words included) on CLIP's table. Prompts of at
    most 75 tokens. Raises PromptError."""
    return plan_several(text, concepts, lambda alone, c: _concept_one(tokenizer, alone, c.token, c.class_word,
                                                                      c.phrase, c.n_vectors).plan,
                        lambda customized, table: tokenize(tokenizer, customized, vector_tokens=table))


def plan_several(text: str, concepts: list[ConceptWords], plan_one, read) -> SeveralConcepts:
    """several_concepts_plan on any token table: `plan_one(text, words)` plans one concept in `text`
    holding it alone (the others written as their class words); `read(text, ((token, n_vectors), ...))`
    reads the customized prompt. Raises PromptError."""
    tokens = [c.token for c in concepts]
    for c in concepts:
        if tokens.count(c.token) > 1:
            raise PromptError(f"the concept token {c.token} is chosen twice; choose two different concepts")
        if any(c.token in other for other in tokens if other != c.token):
            raise PromptError(f"the concept token {c.token} is part of another concept's token; rename one of them")
    plans = []
    for c in concepts:
        alone = text
        for other in concepts:
            if other is not c:
                if text.count(other.token) != 1:
                    raise PromptError(f"the concept token {other.token} must appear once in the prompt")
                alone = other.as_class_word(alone)
        plans.append(plan_one(alone, c))
    if len({plan.target.ids for plan in plans}) != 1:
        raise PromptError("the concepts' class words do not line up in one prompt; write each concept once, "
                          "apart from the others")
    customized = text
    for c in concepts:
        customized = customized if c.phrase != "{token}" and c.expanded in customized else \
            customized.replace(c.token, c.expanded)
    table = tuple((c.token, c.n_vectors) for c in concepts if c.n_vectors)
    return SeveralConcepts(read(customized, table), tuple(plans))
