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

Long prompts (more than the 75 tokens CLIP reads), LongAlign-style: the text is split into
sentences (not at abbreviations, initials or decimals), sentences longer than 75 tokens at commas,
then between words; consecutive pieces are packed into segments of at most 75 tokens. Each segment
is encoded on its own; the conditioning keeps every segment's start token and content tokens
(end and padding tokens are dropped) and `Prompt.parts` holds the segments. Positions are global:
the rows of the concatenated conditioning, segment after segment. p' is built per segment, each
segment all `*` except the swapped words.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from .errors import PromptError
from .segments import pieces
from .settings import LONG_MODES

STAR = "*"
PUNCTUATION = ".,;:!?\"'()[]"
MAX_SEGMENT_ROWS = 4 * 77  # conditioning rows a segmented prompt may have (start tokens included)
# Segment mode reads at most 308 positions, about 1,200 characters of English; a prompt past this
# is refused before it is tokenized, in every long-prompt mode (truncate would read 75 tokens of it).
MAX_PROMPT_CHARS = 4000
MAX_SWAPS = 75  # swaps in one request: as many as the positions CLIP reads in one segment
MAX_SWAP_CHARS = 200  # one `WORD=SOURCE` swap: a word or position, and a source of a few words


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
    parts: tuple[Prompt, ...] = ()  # a long prompt's segments, each a normal prompt; () = not segmented
    dropped: str = ""  # words cut off by truncation

    @property
    def content(self) -> list[int]:
        """Positions of the prompt's own tokens (no start or end tokens; a T5 table has no start token)."""
        return [t.position for t in self.tokens if t.word_index >= 0]

    @property
    def starts(self) -> tuple[int, ...]:
        """Global position of each segment's start token ((0,) for a normal prompt)."""
        out, at = [], 0
        for part in self.parts:
            out.append(at)
            at += len(part.ids) - 1
        return tuple(out) or (0,)

    def locate(self, position: int) -> tuple[int, int]:
        """(segment, position inside the segment) of a global position."""
        k = max(i for i, s in enumerate(self.starts) if s <= position)
        return k, position - self.starts[k]


@dataclass(frozen=True)
class SwapPlan:
    """Rows `positions` of `target`'s encoding are replaced by the same rows of `source`'s."""

    target: Prompt  # p: what the row is generated from
    source: Prompt  # p': same length as p
    positions: tuple[int, ...]

    def narrowed(self, chosen: set[int]) -> SwapPlan:
        """This plan writing only those of its positions that are `chosen`."""
        return replace(self, positions=tuple(q for q in self.positions if q in chosen))

    def unstarred(self) -> tuple[int, ...]:
        """The positions where p' holds its own tokens rather than `*`: a concept's every token, a
        longer concept's spill included (Custom Diffusion's modifier token, written over the word
        before the class word), where `positions` holds the class word's only."""
        return tuple(t.position for t in self.source.tokens if t.word_index >= 0 and t.text != STAR)


def _bare(tok: str) -> str:
    return tok[:-4] if tok.endswith("</w>") else tok


def max_tokens(tokenizer) -> int:
    return tokenizer.model_max_length - 2


def tokenize(tokenizer, text: str, vector_token: str | None = None, n_vectors: int = 0,
             limit: bool = True, vector_tokens: tuple[tuple[str, int], ...] = ()) -> Prompt:
    """Tokenize `text` word by word; `vector_token` (if given) becomes `n_vectors` positions.
    Several concepts: `vector_tokens` lists (token, n_vectors) each, their vectors numbered on in
    that order."""
    table = ((vector_token, n_vectors),) if vector_token else vector_tokens
    offsets = {tok: sum(n for _, n in table[:i]) for i, (tok, _) in enumerate(table)}
    counts = dict(table)
    ids, tokens, vectors = [tokenizer.bos_token_id], [Token(0, tokenizer.bos_token, "", -1)], {}
    for wi, word in enumerate(text.split()):
        pieces, here = [word], next((tok for tok, _ in table if tok in word), None)
        if here is not None:
            pre, post = word.split(here, 1)
            pieces = [pre, None, post]
        for piece in pieces:
            if piece is None:
                for k in range(counts[here]):
                    vectors[len(ids)] = offsets[here] + k
                    tokens.append(Token(len(ids), here if k == 0 else f"{here}_{k}", word, wi))
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


def _word_hits(prompt: Prompt, tokenizer, word: str) -> tuple[list[int], int]:
    """Start positions of `word`'s tokens in `prompt`, and its token count."""
    want = tokenize(tokenizer, word, limit=False).ids[1:-1]
    if not want:
        raise PromptError(f"{word!r} has no tokens")
    ids, content = prompt.ids, set(prompt.content)
    hits = [i for i in sorted(content) if ids[i:i + len(want)] == want and i + len(want) - 1 in content
            and not any(j in prompt.vectors for j in range(i, i + len(want)))]
    return hits, len(want)


def find_word(prompt: Prompt, tokenizer, word: str) -> tuple[int, ...]:
    """Positions of `word`'s tokens in `prompt`; it must occur exactly once."""
    hits, n = _word_hits(prompt, tokenizer, word)
    if not hits:
        raise PromptError(f"the word {word!r} is not in the prompt")
    if len(hits) > 1:
        raise PromptError(f"the word {word!r} occurs {len(hits)} times in the prompt; "
                          f"choose one by position (POS=SOURCE)")
    return tuple(range(hits[0], hits[0] + n))


def _dummy_rows(tokenizer, length: int, pieces: list[tuple[int, Prompt, tuple[int, ...]]]) -> tuple:
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


def dummy_prompt(tokenizer, length: int, pieces, vector_token: str | None, n_vectors: int) -> Prompt:
    ids, texts, vectors = _dummy_rows(tokenizer, length, pieces)
    # Text of p' as a person would write it; multi-vector tokens collapse back into one word.
    words = [t for i, t in enumerate(texts[1:-1], 1) if not (i in vectors and vectors[i] > 0)]
    text = " ".join(words)
    again = tokenize(tokenizer, text, vector_token, n_vectors)
    if list(again.ids) != ids or again.vectors != vectors:
        raise PromptError(f"the dummy prompt {text!r} does not tokenize back to the same positions; "
                          f"this swap cannot be aligned")
    return again


def _target_word(target: str) -> str:
    """A swap target as typed, without the punctuation around it (`cat.` names the cat, not the full
    stop that right alignment would otherwise pick)."""
    return target.strip(PUNCTUATION) or target


def _word_swap_one(tokenizer, text: str, swaps: list[tuple[str | int, str]]) -> SwapPlan:
    """word_swap_plan for a prompt of at most 75 tokens (one segment)."""
    p = tokenize(tokenizer, text)
    pieces, positions = [], []
    for target, source in swaps:
        src = tokenize(tokenizer, source)
        n_src = len(src.ids) - 2
        if n_src == 0:
            raise PromptError(f"the swap source for {target!r} is empty")
        if isinstance(target, int):
            _check_position(p, target, p.content)
            tpos = tuple(range(target - n_src + 1, target + 1))
            if tpos[0] < 1:
                raise PromptError(f"{source!r} is {n_src} tokens and cannot end at position {target}")
        else:
            tpos = find_word(p, tokenizer, _target_word(target))
        if n_src > len(tpos) and not isinstance(target, int):
            raise PromptError(f"{source!r} is {n_src} tokens but {target!r} has only {len(tpos)}; "
                              f"choose a shorter source word")
        start = tpos[-1] - n_src + 1  # right alignment
        covered = tuple(range(start, tpos[-1] + 1))
        if set(covered) & set(positions):
            raise PromptError(f"swaps overlap at position(s) {sorted(set(covered) & set(positions))}")
        pieces.append((start, src, tuple(range(1, n_src + 1))))
        positions.extend(covered)
    source = dummy_prompt(tokenizer, len(p.ids), pieces, None, 0)
    return SwapPlan(p, source, tuple(sorted(positions)))


def positions_plan(p: Prompt, source: Prompt, positions: list[int]) -> SwapPlan:
    """Swap explicit positions from an explicit source prompt of the same length (e.g. p itself)."""
    if len(source.ids) != len(p.ids):
        raise PromptError(f"the source prompt has {len(source.ids)} positions, the prompt {len(p.ids)}")
    return SwapPlan(p, source, check_positions(p, positions))


def check_positions(p: Prompt, positions) -> tuple[int, ...]:
    """Validate user-chosen swap positions: integers, unique, inside the prompt's tokens."""
    out, content = [], p.content
    for raw in positions:
        try:
            pos = int(raw)
            if str(raw).strip() not in (str(pos), f"+{pos}") and not isinstance(raw, int):
                raise ValueError
        except (TypeError, ValueError):
            raise PromptError(f"position {raw!r} is not a whole number") from None
        _check_position(p, pos, content)
        if pos in out:
            raise PromptError(f"position {pos} is given twice")
        out.append(pos)
    if not out:
        raise PromptError("choose at least one position to swap")
    return tuple(sorted(out))


def _check_position(p: Prompt, pos: int, content: list[int]) -> None:
    if pos == 0:
        raise PromptError("position 0 is the start token; swap positions start at 1")
    if not content:
        raise PromptError("the prompt has no tokens to swap")
    if pos < 0 or pos > content[-1]:
        raise PromptError(f"position {pos} is outside the prompt (positions 1..{content[-1]})")
    if pos in p.starts:
        raise PromptError(f"position {pos} is the start token of segment {p.starts.index(pos) + 1}; "
                          f"choose a word's position")


def check_swaps(swaps: list) -> None:
    """Refuse more than MAX_SWAPS swaps, or one longer than MAX_SWAP_CHARS written as `WORD=SOURCE`,
    before any is read. `swaps`: specs as typed, or (target, source) pairs."""
    if len(swaps) > MAX_SWAPS:
        raise PromptError(f"there are {len(swaps)} swaps; the limit is {MAX_SWAPS}")
    for swap in swaps:
        spec = swap if isinstance(swap, str) else f"{swap[0]}={swap[1]}"
        if len(spec) > MAX_SWAP_CHARS:
            raise PromptError(f"the swap {spec[:24] + '…'!r} is {len(spec)} characters; "
                              f"the limit is {MAX_SWAP_CHARS}")


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


# ------------------------------------------------------------------------------ long prompts

def fit(tokenizer, text: str, mode: str, count=None) -> tuple[list[str], str]:
    """How an over-long prompt is read: ([text], "") when it fits; segment texts in `segments`
    mode; ([kept text], dropped words) in `truncate` mode; a PromptError in `refuse` mode.
    `count(word)` gives a word's token count (default: the tokenizer's)."""
    if mode not in LONG_MODES:
        raise PromptError(f"unknown long-prompt mode {mode!r}; choose one of {', '.join(LONG_MODES)}")
    limit = max_tokens(tokenizer)
    words = text.split()
    count = count or (lambda w: len(tokenize(tokenizer, w, limit=False).ids) - 2)
    counts = [count(w) for w in words]
    total = sum(counts)
    if total <= limit:
        return [text], ""
    if mode == "refuse":
        raise PromptError(f"the prompt is {total} tokens long; this model reads at most {limit} "
                          f"(long-prompt mode 'segments' reads longer prompts)")
    if mode == "truncate":
        kept, used = 0, 0
        while kept < len(words) and used + counts[kept] <= limit:
            used += counts[kept]
            kept += 1
        return [" ".join(words[:kept])], " ".join(words[kept:])
    groups = pieces(words, counts, limit)
    rows = total + len(groups)
    if rows > MAX_SEGMENT_ROWS:
        raise PromptError(f"the prompt is {total} tokens long in {len(groups)} segments; segment mode reads at "
                          f"most {MAX_SEGMENT_ROWS} positions (about {MAX_SEGMENT_ROWS - 4} tokens)")
    return [" ".join(words[i] for i in g) for g in groups], ""


def join(parts: list[Prompt], text: str) -> Prompt:
    """One long prompt from its segments: each segment's start and content tokens, in order."""
    ids, tokens, vectors, words = [], [], {}, 0
    for part in parts:
        at = len(ids)
        for t in part.tokens[:-1]:
            tokens.append(Token(at + t.position, t.text, t.word, t.word_index + words if t.word_index >= 0 else -1))
        ids += part.ids[:-1]
        vectors.update({at + pos: k for pos, k in part.vectors.items()})
        words += max((t.word_index for t in part.tokens), default=-1) + 1
    return Prompt(text, tuple(ids), tuple(tokens), vectors, tuple(parts))


def read_prompt(tokenizer, text: str, long: str = "segments") -> Prompt:
    """The prompt as the model reads it: one normal prompt when it fits, else per `long`."""
    texts, dropped = fit(tokenizer, text, long)
    if len(texts) == 1:
        return replace(tokenize(tokenizer, texts[0]), dropped=dropped)
    return join([tokenize(tokenizer, t) for t in texts], text)


def stars(tokenizer, like: Prompt) -> Prompt:
    """A p' segment with nothing swapped: `*` at every content position of `like`."""
    return dummy_prompt(tokenizer, len(like.ids), [], None, 0)


def global_positions(p: Prompt, segment: int, positions) -> tuple[int, ...]:
    return tuple(p.starts[segment] + q for q in positions)


def word_swap_plan(tokenizer, text: str, swaps: list[tuple[str | int, str]], long: str = "segments") -> SwapPlan:
    """Token swaps: each (target word or position, source word). The source word's rows come from
    one dummy prompt p' holding every source word at its target's positions, `*` elsewhere.
    Over 75 tokens, `long` decides: segments (p' per segment), truncate or refuse."""
    if not swaps:
        raise PromptError("no swap given: name a word or position and a source, e.g. dog=zebra")
    check_swaps(swaps)
    texts, dropped = fit(tokenizer, text, long)
    if len(texts) == 1:
        if dropped:
            _refuse_cut_words(tokenizer, texts[0], dropped, swaps)
        plan = _word_swap_one(tokenizer, texts[0], swaps)
        return replace(plan, target=replace(plan.target, dropped=dropped)) if dropped else plan
    parts = [tokenize(tokenizer, t) for t in texts]
    p = join(parts, text)
    local: dict[int, list] = {}
    for target, source in swaps:
        if isinstance(target, int):
            _check_position(p, target, p.content)
            k, q = p.locate(target)
        else:
            hits = [(k, h) for k, part in enumerate(parts)
                    for h in _word_hits(part, tokenizer, _target_word(target))[0]]
            if not hits:
                raise PromptError(f"the word {target!r} is not in the prompt")
            if len(hits) > 1:
                raise PromptError(f"the word {target!r} occurs {len(hits)} times in the prompt; "
                                  f"choose one by position (POS=SOURCE)")
            k, q = hits[0][0], target
        local.setdefault(k, []).append((q, source))
    sources, positions = [], []
    for k, part in enumerate(parts):
        if k in local:
            plan = _word_swap_one(tokenizer, texts[k], local[k])
            sources.append(plan.source)
            positions += global_positions(p, k, plan.positions)
        else:
            sources.append(stars(tokenizer, part))
    return SwapPlan(p, join(sources, " ".join(s.text for s in sources)), tuple(positions))


def _refuse_cut_words(tokenizer, kept: str, dropped: str, swaps) -> None:
    """A swap target that truncation cut off is named as such, not as a word missing from the prompt."""
    p, cut = tokenize(tokenizer, kept), tokenize(tokenizer, dropped, limit=False)
    for target, _ in swaps:
        if isinstance(target, str):
            word = _target_word(target)
            if not _word_hits(p, tokenizer, word)[0] and _word_hits(cut, tokenizer, word)[0]:
                raise PromptError(f"the word {target!r} was cut off: it lies beyond the {max_tokens(tokenizer)} "
                                  f"tokens this model reads (long-prompt mode 'truncate'); move it forward or use "
                                  f"long-prompt mode 'segments'")
