"""Text on MMDiT pipelines: token tables of p and p', which joint-text rows a swap writes, and the
pipelines' own text encodings (op for op, so a run without a swap is bit-identical to the pipeline).

SD3's joint text is [CLIP rows (77: CLIP-L and CLIP-G states side by side, zero-padded to T5's
width) ; T5 rows (`text_tokens` of them; zeros when the pipeline has no T5)]. Flux's is the T5 rows
alone; its CLIP gives only the pooled vector. People choose positions in the *primary* table (CLIP
for SD3, T5 for Flux: the tokens the model reads as rows); on SD3 the T5 rows of the same words are
swapped too, paired word by word and right-aligned (the last token of a word is its head).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from ..encoding import encode
from ..errors import PromptError
from ..prompts import PUNCTUATION, STAR, Token, tokenize

CLIP_ROWS = 77


@dataclass(frozen=True)
class TokenTable:
    """A prompt as one tokenizer reads it: ids without padding, one Token per id."""

    text: str
    ids: tuple[int, ...]
    tokens: tuple[Token, ...]
    vectors: dict = field(default_factory=dict)  # position -> concept vector index (its token's rows)

    @property
    def content(self) -> list[int]:
        """Positions of the prompt's own tokens (no start, end or padding)."""
        return [t.position for t in self.tokens if t.word_index >= 0]

    def of_word(self, word_index: int) -> list[int]:
        return [t.position for t in self.tokens if t.word_index == word_index]


@dataclass(frozen=True, eq=False)
class ConceptVectors:
    """A textual-inversion concept on an MMDiT's text encoders: its token as prompts write it and its
    vectors, one (n, width) tensor per text encoder in the pipeline's order (SD3: CLIP-L, CLIP-G (, T5);
    Flux: CLIP, T5), written into the token embeddings where a prompt holds the token."""

    token: str
    vectors: tuple
    # several concepts in one customized model (concepts.one_model): (token, vector count) each, in the
    # order `vectors` stacks them; empty: `token` alone holds them all
    tokens: tuple[tuple[str, int], ...] = ()

    @property
    def n(self) -> int:
        return self.vectors[0].shape[0]

    @property
    def table(self) -> tuple[tuple[str, int], ...]:
        """(token, vector count) of each concept, their vectors numbered on in this order."""
        return self.tokens or ((self.token, self.n),)

    def held_by(self, text: str) -> ConceptVectors | None:
        return self if all(token in text for token, _ in self.table) else None


def clip_table(tokenizer, text: str, concept: ConceptVectors | None = None) -> TokenTable:
    """CLIP's reading of `text` (the project's word-by-word table, checked against the tokenizer's
    own reading of the whole text, which is what the pipeline encodes; a concept's token is its
    vectors' positions). Raises PromptError past 75 tokens (the pipelines cut CLIP there)."""
    if concept is not None and concept.held_by(text):
        p = tokenize(tokenizer, text, vector_tokens=concept.table)
        return TokenTable(text, p.ids, p.tokens, dict(p.vectors))
    p = tokenize(tokenizer, text)
    whole = tokenizer(text, truncation=False).input_ids
    if list(p.ids) != list(whole):
        raise PromptError(f"CLIP reads {text!r} differently word by word and as a whole; reword it "
                          f"(e.g. separate punctuation with spaces)")
    return TokenTable(text, p.ids, p.tokens)


def t5_table(tokenizer, text: str, rows: int, concept: ConceptVectors | None = None) -> TokenTable:
    """T5's reading of `text` (no start token; the end token `</s>` last; a concept's token is read
    as `*` and stands for its vectors' positions). Raises PromptError when it needs more than the
    `rows` the model reads."""
    if concept is not None and concept.held_by(text):
        return _t5_concept_table(tokenizer, text, rows, concept)
    enc = tokenizer(text, return_offsets_mapping=True, truncation=False)
    if len(enc.input_ids) > rows:
        raise PromptError(f"the prompt is {len(enc.input_ids)} T5 tokens long; this model reads {rows} "
                          f"(shorten the prompt)")
    spans, at = [], 0
    for word in text.split():  # the character span of each whitespace-separated word
        at = text.index(word, at)
        spans.append((at, at + len(word)))
        at += len(word)
    words = text.split()
    tokens = []
    for pos, (tid, (a, b)) in enumerate(zip(enc.input_ids, enc.offset_mapping)):
        w = next((k for k, (s, e) in enumerate(spans) if s <= a < e), -1) if b > a else -1
        piece = tokenizer.convert_ids_to_tokens(tid)
        tokens.append(Token(pos, piece.lstrip("▁") or piece, words[w] if w >= 0 else "", w))
    return TokenTable(text, tuple(enc.input_ids), tuple(tokens))


def word_pairs(p: TokenTable, source: TokenTable, words: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(position in p, position in p') for the tokens of `words` ((word index in p, in p') pairs),
    right-aligned per word; a word p' lacks is left out."""
    pairs = []
    for w, w_source in words:
        a, b = p.of_word(w), source.of_word(w_source)
        n = min(len(a), len(b))
        pairs += list(zip(a[len(a) - n:], b[len(b) - n:]))
    return pairs


# ------------------------------------------------------------------------------ encodings

def _ids(tokenizer, text: str, length: int, device) -> torch.Tensor:
    return tokenizer(text, padding="max_length", max_length=length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def _written(tokenizer, table: TokenTable, length: int, vectors: torch.Tensor, device):
    """(ids (1, length) padded as the tokenizer pads, vectors (1, length, width), mask (1, length)):
    a concept's vectors at `table`'s vector positions."""
    ids = torch.tensor([list(table.ids) + [tokenizer.pad_token_id] * (length - len(table.ids))], device=device)
    written = torch.zeros(*ids.shape, vectors.shape[1], device=device, dtype=vectors.dtype)
    mask = torch.zeros(ids.shape, dtype=torch.bool, device=device)
    for pos, k in table.vectors.items():
        written[0, pos], mask[0, pos] = vectors[k], True
    return ids, written, mask


def _clip_written(pipe, tokenizer, encoder, text: str, concept: ConceptVectors, k: int, device):
    """CLIP encoder `k` (pipeline order) run from token embeddings with the concept's vectors written in."""
    ids, written, mask = _written(tokenizer, clip_table(tokenizer, text, concept), pipe.tokenizer_max_length,
                                  concept.vectors[k], device)
    return encode(encoder, ids, written, mask, penultimate=True)


def _t5_run(t5, tokenizer, text: str, rows: int, concept: ConceptVectors | None, k: int, device):
    """T5's last hidden state of `text` (1, rows, width); with a concept held by `text`, from
    `inputs_embeds` with its vectors written in."""
    if concept is None:
        return t5(_ids(tokenizer, text, rows, device))[0]
    ids, written, mask = _written(tokenizer, t5_table(tokenizer, text, rows, concept), rows, concept.vectors[k], device)
    embeds = t5.get_input_embeddings()(ids)
    return t5(inputs_embeds=torch.where(mask.unsqueeze(-1), written.to(embeds.dtype), embeds))[0]


@torch.no_grad()
def encode_sd3(pipe, text: str, encoders, t5_rows: int, concept: ConceptVectors | None = None):
    """(hidden (1, 77 + t5_rows, joint dim), pooled (1, pooled dim)) exactly as
    StableDiffusion3Pipeline.encode_prompt computes them for one prompt (no clip skip); with a
    `concept` whose token `text` holds, its vectors written into each encoder's token embeddings."""
    device, dtype = pipe._execution_device, encoders[0].dtype
    concept = concept.held_by(text) if concept is not None else None
    hidden, pooled = [], []
    for k, (tokenizer, encoder) in enumerate(zip((pipe.tokenizer, pipe.tokenizer_2), encoders[:2])):
        if concept is not None:
            out = _clip_written(pipe, tokenizer, encoder, text, concept, k, device)
            pooled.append(encoder.text_projection(out.pooled))
            hidden.append(out.hidden.to(dtype=dtype, device=device))
            continue
        out = encoder(_ids(tokenizer, text, pipe.tokenizer_max_length, device), output_hidden_states=True)
        pooled.append(out[0])
        hidden.append(out.hidden_states[-2].to(dtype=dtype, device=device))
    clip = torch.cat(hidden, dim=-1)
    t5 = encoders[2]
    if t5 is None:
        t5_hidden = torch.zeros((1, t5_rows, pipe.transformer.config.joint_attention_dim), device=device, dtype=dtype)
    else:
        t5_hidden = _t5_run(t5, pipe.tokenizer_3, text, t5_rows, concept, 2, device).to(dtype=t5.dtype, device=device)
    clip = F.pad(clip, (0, t5_hidden.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5_hidden], dim=-2), torch.cat(pooled, dim=-1)


@torch.no_grad()
def encode_flux(pipe, text: str, encoders, t5_rows: int, concept: ConceptVectors | None = None):
    """(hidden (1, t5_rows, joint dim), pooled (1, pooled dim)) exactly as FluxPipeline.encode_prompt
    computes them for one prompt; with a `concept` whose token `text` holds, its vectors written in."""
    device = pipe._execution_device
    clip, t5 = encoders
    concept = concept.held_by(text) if concept is not None else None
    if concept is not None:
        pooled = _clip_written(pipe, pipe.tokenizer, clip, text, concept, 0, device).pooled.to(dtype=clip.dtype)
        hidden = _t5_run(t5, pipe.tokenizer_2, text, t5_rows, concept, 1, device)
        return hidden.to(dtype=t5.dtype, device=device), pooled
    pooled = clip(_ids(pipe.tokenizer, text, pipe.tokenizer_max_length, device), output_hidden_states=False)
    pooled = pooled.pooler_output.to(dtype=clip.dtype, device=device)
    hidden = t5(_ids(pipe.tokenizer_2, text, t5_rows, device), output_hidden_states=False)[0]
    return hidden.to(dtype=t5.dtype, device=device), pooled


# ------------------------------------------------------------------------------ word swaps on T5 (Flux)

def _lexical(table: TokenTable, word: int) -> list[int]:
    """The positions of a word's tokens that are not punctuation alone (`dog.` -> `▁dog`)."""
    return [q for q in table.of_word(word) if table.tokens[q].text.strip(PUNCTUATION + "▁")]


def t5_swap_plan(tokenizer, text: str, swaps: list[tuple[str | int, str]], rows: int):
    """Token swaps on T5's reading of `text` (Flux's primary table): (p, p', written positions of p,
    the positions of p' they read, in pairs). p' is every word `*` but each swapped word, written as
    its source in its place. A word's tokens and its source's are paired right-aligned, as SD3's T5
    rows are (`word_pairs`: the last token is the head; T5 reads both ways, so it carries the whole
    word): a source longer than the word gives its last tokens. A position names the tokens of its
    word up to it. `*` and the words differ in T5 tokens, so p' is read at its own positions.
    Raises PromptError."""
    p = t5_table(tokenizer, text, rows)
    words, chosen = text.split(), {}  # word index of p -> (source, its written tokens of p)
    for target, source in swaps:
        source = " ".join(str(source).split())
        if not source:
            raise PromptError(f"the swap source for {target!r} is empty")
        if isinstance(target, int):
            c = p.content
            if target not in c:
                raise PromptError(f"position {target} is not a token of the prompt (T5 reads it as positions "
                                  f"{c[0]}..{c[-1]}, the first word at {c[0]}; `tokens` shows them)")
            w = p.tokens[target].word_index
            own = [q for q in p.of_word(w) if q <= target]
        else:
            bare = target.strip(PUNCTUATION) or target
            hits = [k for k, x in enumerate(words) if x.strip(PUNCTUATION) == bare or x == target]
            if not hits:
                raise PromptError(f"the word {target!r} is not in the prompt")
            if len(hits) > 1:
                raise PromptError(f"the word {target!r} occurs {len(hits)} times in the prompt; "
                                  f"choose one by position (POS=SOURCE)")
            w = hits[0]
            own = _lexical(p, w) or p.of_word(w)
        if w in chosen:
            raise PromptError(f"two swaps name the word {words[w]!r}; give it one source")
        chosen[w] = (source, own)
    dummy, slots = [], {}  # p' words; word index of p -> p''s word indices of its source
    for k in range(len(words)):
        source = chosen[k][0] if k in chosen else STAR
        slots[k] = range(len(dummy), len(dummy) + len(source.split()))
        dummy += source.split()
    src = t5_table(tokenizer, " ".join(dummy), rows)
    pairs = []
    for w, (source, own) in sorted(chosen.items()):
        read = [q for v in slots[w] for q in _lexical(src, v)] or [q for v in slots[w] for q in src.of_word(v)]
        n = min(len(own), len(read))
        pairs += list(zip(own[len(own) - n:], read[len(read) - n:]))
    pairs.sort()
    return p, src, tuple(a for a, _ in pairs), tuple(b for _, b in pairs)


# ------------------------------------------------------------------------------ concepts on T5

def _t5_concept_table(tokenizer, text: str, rows: int, concept: ConceptVectors) -> TokenTable:
    """t5_table of `text` whose concept tokens (each once, in a word of its own) are read as `*`, each
    then standing for its vectors' positions (numbered on in the concepts' order)."""
    words = text.split()
    where, first = {}, 0  # word index -> (concept token, its first vector, vector count)
    for token, n in concept.table:
        if text.count(token) != 1:
            raise PromptError(f"the concept token {token} must appear once in the prompt")
        w = next(k for k, word in enumerate(words) if token in word)
        if w in where:
            raise PromptError(f"{where[w][0]} and {token} share the word {words[w]!r}; separate them with a space")
        where[w], first = (token, first, n), first + n
    starred = text
    for token, _ in concept.table:
        starred = starred.replace(token, STAR)
    read = t5_table(tokenizer, starred, rows - first + len(where))
    for w, (token, _, _) in where.items():
        if sum(t.word_index == w and t.text == STAR for t in read.tokens) != 1:
            raise PromptError(f"T5 does not read {words[w]!r} with {token} as one token; "
                              f"separate the concept token from what surrounds it with spaces")
    ids, tokens, vectors = [], [], {}
    for t in read.tokens:
        word = words[t.word_index] if t.word_index >= 0 else ""
        token, start, n = where[t.word_index] if t.word_index in where and t.text == STAR else (None, 0, 1)
        for k in range(n):
            if token is not None:
                vectors[len(ids)] = start + k
            text_k = t.text if token is None else token if k == 0 else f"{token}_{k}"
            tokens.append(replace(t, position=len(ids), text=text_k, word=word))
            ids.append(read.ids[t.position])
    return TokenTable(text, tuple(ids), tuple(tokens), vectors)


def t5_concept_plan(tokenizer, text: str, words, rows: int):
    """A concept on T5's reading (Flux's primary table), planned word by word as `t5_swap_plan`
    plans swaps: (customized table, p, p', written positions of p, the positions of p' they read).
    p is the concept (its phrase, e.g. `{token}`) replaced by its class word; p' is `*` for every
    other word and the concept's words as the customized prompt writes them; the class word's
    tokens and the concept's (its vectors last) are paired right-aligned. `words` is a
    concept_prompts.ConceptWords; a concept without vectors (a LoRA's trigger word) is read as text.
    Raises PromptError."""
    token, class_word = words.token, words.class_word
    count = text.count(token)
    if count != 1:
        raise PromptError(f"the concept token {token} is not in the prompt" if not count else
                          f"the concept token {token} appears {count} times; use it once")
    expanded = words.expanded
    customized = text if words.phrase != "{token}" and expanded in text else text.replace(token, expanded)
    concept = ConceptVectors(token, (torch.zeros(words.n_vectors, 1),)) if words.n_vectors else None
    p_text = customized.replace(expanded, class_word)
    prefix = customized.split(expanded)[0]
    start = len(prefix.split()) - (1 if prefix and not prefix[-1].isspace() else 0)
    p_words, c_words = p_text.split(), customized.split()
    n_class = len(p_words) - (len(c_words) - len(expanded.split()))  # the class word's words in p
    n_concept = len(c_words) - len(p_words) + n_class
    source = [STAR] * start + c_words[start:start + n_concept] + [STAR] * (len(p_words) - start - n_class)
    table = t5_table(tokenizer, customized, rows, concept)
    p = t5_table(tokenizer, p_text, rows)
    src = t5_table(tokenizer, " ".join(source), rows, concept)
    own = [q for w in range(start, start + n_class) for q in (_lexical(p, w) or p.of_word(w))]
    read = [q for w in range(start, start + n_concept) for q in (_lexical(src, w) or src.of_word(w))]
    n = min(len(own), len(read))
    if not n:
        raise PromptError(f"the class word {class_word!r} has no tokens to write {token} into")
    return table, p, src, tuple(own[len(own) - n:]), tuple(read[len(read) - n:])
