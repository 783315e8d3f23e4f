"""Tokenization, word <-> token positions, the class-word prompt p and the dummy prompt p'.

Positions are those the text encoder sees: 0 is the start token, 1..n the prompt's tokens, n+1
the end token. A concept token (`<striped-ball>`) is never added to the tokenizer; it stands in
the token list as its learned vectors, one position each.

Alignment of p' with p (when the concept and the class word differ in length): **right
alignment**. The concept phrase is written into p' so that its last token lands on the class
word's last token; the swapped positions are the class word's positions that a concept token
covers. A longer concept spills into the `*` positions before the class word (those rows are not
swapped, but CLIP's causal encoder folds them into the rows that are); a shorter concept swaps
only the class word's last token(s), the head of an English noun phrase. Every p' is checked by
tokenizing its text again.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import PromptError

STAR = "*"


@dataclass(frozen=True)
class Token:
    position: int
    text: str  # as shown to people: "dog", "<striped-ball>", "<|startoftext|>"
    word: str  # the whitespace-separated word it belongs to; "" for start/end
    word_index: int  # -1 for start/end


@dataclass(frozen=True)
class Prompt:
    """A tokenized prompt; `vectors` maps positions to the concept vector written there."""

    text: str
    ids: tuple[int, ...]  # start .. end, no padding
    tokens: tuple[Token, ...]
    vectors: dict[int, int] = field(default_factory=dict)  # position -> concept vector index

    @property
    def content(self) -> range:
        """Positions of the prompt's own tokens (neither start nor end)."""
        return range(1, len(self.ids) - 1)


@dataclass(frozen=True)
class SwapPlan:
    """Rows `positions` of `target`'s encoding are replaced by the same rows of `source`'s."""

    target: Prompt  # p: what the row is generated from
    source: Prompt  # p': same length as p
    positions: tuple[int, ...]


def _bare(tok: str) -> str:
    return tok[:-4] if tok.endswith("</w>") else tok


def max_tokens(tokenizer) -> int:
    return tokenizer.model_max_length - 2


def tokenize(tokenizer, text: str, vector_token: str | None = None, n_vectors: int = 0,
             limit: bool = True) -> Prompt:
    """Tokenize `text` word by word; `vector_token` (if given) becomes `n_vectors` positions."""
    ids, tokens, vectors = [tokenizer.bos_token_id], [Token(0, tokenizer.bos_token, "", -1)], {}
    for wi, word in enumerate(text.split()):
        pieces = [word]
        if vector_token and vector_token in word:
            pre, post = word.split(vector_token, 1)
            pieces = [pre, None, post]
        for piece in pieces:
            if piece is None:
                for k in range(n_vectors):
                    vectors[len(ids)] = k
                    tokens.append(Token(len(ids), vector_token if k == 0 else f"{vector_token}_{k}", word, wi))
                    ids.append(tokenizer.convert_tokens_to_ids(STAR + "</w>"))
                continue
            for bpe in tokenizer.tokenize(piece) if piece else []:
                tokens.append(Token(len(ids), _bare(bpe), word, wi))
                ids.append(tokenizer.convert_tokens_to_ids(bpe))
    n = len(ids) - 1
    if limit and n > max_tokens(tokenizer):
        raise PromptError(f"the prompt is {n} tokens long; this model reads at most {max_tokens(tokenizer)}")
    tokens.append(Token(len(ids), tokenizer.eos_token, "", -1))
    ids.append(tokenizer.eos_token_id)
    return Prompt(text, tuple(ids), tuple(tokens), vectors)


def padded(prompt: Prompt, tokenizer) -> list[int]:
    return list(prompt.ids) + [tokenizer.pad_token_id] * (tokenizer.model_max_length - len(prompt.ids))


def find_word(prompt: Prompt, tokenizer, word: str) -> tuple[int, ...]:
    """Positions of `word`'s tokens in `prompt`; it must occur exactly once."""
    want = tokenize(tokenizer, word).ids[1:-1]
    if not want:
        raise PromptError(f"{word!r} has no tokens")
    ids = prompt.ids
    hits = [i for i in prompt.content if ids[i:i + len(want)] == want and i + len(want) <= len(ids) - 1
            and not any(j in prompt.vectors for j in range(i, i + len(want)))]
    if not hits:
        raise PromptError(f"the word {word!r} is not in the prompt")
    if len(hits) > 1:
        raise PromptError(f"the word {word!r} occurs {len(hits)} times in the prompt; "
                          f"choose one by position (POS=SOURCE)")
    return tuple(range(hits[0], hits[0] + len(want)))


def _dummy(tokenizer, length: int, pieces: list[tuple[int, Prompt, tuple[int, ...]]]) -> tuple:
    """Ids, tokens and vectors of a p' of `length` positions: `*` everywhere except the given
    (start position, source prompt, source positions) pieces."""
    star = tokenizer.convert_tokens_to_ids(STAR + "</w>")
    ids = [tokenizer.bos_token_id] + [star] * (length - 2) + [tokenizer.eos_token_id]
    texts = [tokenizer.bos_token] + [STAR] * (length - 2) + [tokenizer.eos_token]
    vectors = {}
    for start, src, src_pos in pieces:
        for k, sp in enumerate(src_pos):
            ids[start + k] = src.ids[sp]
            texts[start + k] = src.tokens[sp].text
            if sp in src.vectors:
                vectors[start + k] = src.vectors[sp]
    return ids, texts, vectors


def _dummy_prompt(tokenizer, length: int, pieces, vector_token: str | None, n_vectors: int) -> Prompt:
    ids, texts, vectors = _dummy(tokenizer, length, pieces)
    # Text of p' as a person would write it; multi-vector tokens collapse back into one word.
    words = [t for i, t in enumerate(texts[1:-1], 1) if not (i in vectors and vectors[i] > 0)]
    text = " ".join(words)
    again = tokenize(tokenizer, text, vector_token, n_vectors)
    if list(again.ids) != ids or again.vectors != vectors:
        raise PromptError(f"the dummy prompt {text!r} does not tokenize back to the same positions; "
                          f"this swap cannot be aligned")
    return again


def word_swap_plan(tokenizer, text: str, swaps: list[tuple[str | int, str]]) -> SwapPlan:
    """Token swaps: each (target word or position, source word). The source word's rows come from
    one dummy prompt p' holding every source word at its target's positions, `*` elsewhere."""
    p = tokenize(tokenizer, text)
    if not swaps:
        raise PromptError("no swap given: name a word or position and a source, e.g. dog=zebra")
    pieces, positions = [], []
    for target, source in swaps:
        src = tokenize(tokenizer, source)
        n_src = len(src.ids) - 2
        if n_src == 0:
            raise PromptError(f"the swap source for {target!r} is empty")
        if isinstance(target, int):
            if target == 0:
                raise PromptError("position 0 is the start token; swap positions start at 1")
            if target < 0 or target >= len(p.ids) - 1:
                raise PromptError(f"position {target} is outside the prompt (positions 1..{len(p.ids) - 2})")
            tpos = tuple(range(target - n_src + 1, target + 1))
            if tpos[0] < 1:
                raise PromptError(f"{source!r} is {n_src} tokens and cannot end at position {target}")
        else:
            tpos = find_word(p, tokenizer, target)
        if n_src > len(tpos) and not isinstance(target, int):
            raise PromptError(f"{source!r} is {n_src} tokens but {target!r} has only {len(tpos)}; "
                              f"choose a shorter source word")
        start = tpos[-1] - n_src + 1  # right alignment
        covered = tuple(range(start, tpos[-1] + 1))
        if set(covered) & set(positions):
            raise PromptError(f"swaps overlap at position(s) {sorted(set(covered) & set(positions))}")
        pieces.append((start, src, tuple(range(1, n_src + 1))))
        positions.extend(covered)
    source = _dummy_prompt(tokenizer, len(p.ids), pieces, None, 0)
    return SwapPlan(p, source, tuple(sorted(positions)))


def positions_plan(p: Prompt, source: Prompt, positions: list[int]) -> SwapPlan:
    """Swap explicit positions from an explicit source prompt of the same length (e.g. p itself)."""
    if len(source.ids) != len(p.ids):
        raise PromptError(f"the source prompt has {len(source.ids)} positions, the prompt {len(p.ids)}")
    return SwapPlan(p, source, check_positions(p, positions))


def check_positions(p: Prompt, positions) -> tuple[int, ...]:
    """Validate user-chosen swap positions: integers, unique, inside the prompt's tokens."""
    out = []
    for raw in positions:
        try:
            pos = int(raw)
            if str(raw).strip() not in (str(pos), f"+{pos}") and not isinstance(raw, int):
                raise ValueError
        except (TypeError, ValueError):
            raise PromptError(f"position {raw!r} is not a whole number") from None
        if pos == 0:
            raise PromptError("position 0 is the start token; swap positions start at 1")
        if pos < 0 or pos > len(p.ids) - 2:
            raise PromptError(f"position {pos} is outside the prompt (positions 1..{len(p.ids) - 2})")
        if pos in out:
            raise PromptError(f"position {pos} is given twice")
        out.append(pos)
    if not out:
        raise PromptError("choose at least one position to swap")
    return tuple(sorted(out))


@dataclass(frozen=True)
class ConceptPrompts:
    customized: Prompt  # the prompt as the customization method reads it
    plan: SwapPlan  # p, p' and the swapped positions


def concept_plan(tokenizer, text: str, token: str, class_word: str, phrase: str,
                 n_vectors: int) -> ConceptPrompts:
    """Build the customized prompt, p (concept phrase -> class word) and p' for a concept whose
    prompt phrase is `phrase` (e.g. "{token}" or "{token} {class_word}")."""
    count = text.count(token)
    if count == 0:
        raise PromptError(f"the concept token {token} is not in the prompt")
    if count > 1:
        raise PromptError(f"the concept token {token} appears {count} times; use it once")
    expanded = phrase.format(token=token, class_word=class_word)
    already = phrase != "{token}" and expanded in text
    customized_text = text if already else text.replace(token, expanded)
    # a concept without vectors (a text-encoder fine-tune) reads its token as ordinary text
    vtok = token if n_vectors else None
    customized = tokenize(tokenizer, customized_text, vtok, n_vectors)
    p_text = customized_text.replace(expanded, class_word)
    p = tokenize(tokenizer, p_text)
    # the concept phrase's positions in the customized prompt
    before = tokenize(tokenizer, customized_text.split(expanded)[0].strip(), limit=False)
    c_start = len(before.ids) - 1
    c_len = len(tokenize(tokenizer, expanded, vtok, n_vectors, limit=False).ids) - 2
    w_len = len(tokenize(tokenizer, class_word, limit=False).ids) - 2
    w_last = c_start + w_len - 1  # class word sits where the phrase starts in p
    start = w_last - c_len + 1
    if start < 1:
        raise PromptError(f"{token} needs {1 - start} more token(s) before it in the prompt to align "
                          f"with {class_word!r}; add a word before it (e.g. 'a {token}')")
    source = _dummy_prompt(tokenizer, len(p.ids), [(start, customized, tuple(range(c_start, c_start + c_len)))],
                           vtok, n_vectors)
    positions = tuple(range(max(start, c_start), w_last + 1))
    return ConceptPrompts(customized, SwapPlan(p, source, positions))


def parse_swap(spec: str) -> tuple[str | int, str]:
    """`dog=zebra` -> ("dog", "zebra"); `4=black` -> (4, "black")."""
    if spec.count("=") != 1:
        raise PromptError(f"swap {spec!r} is not of the form WORD=SOURCE or POS=SOURCE")
    target, source = (s.strip() for s in spec.split("="))
    if not target or not source:
        raise PromptError(f"swap {spec!r} needs both a target and a source")
    if target.lstrip("-").isdigit():
        return int(target), source
    return target, source
