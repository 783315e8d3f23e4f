"""Long prompts, LongAlign-style: how a text over the 75 tokens CLIP reads is cut into segments.

The text is split into sentences (not at abbreviations, initials or decimals), sentences longer
than the limit at clause marks, then between words; consecutive pieces are packed into segments
of at most the limit. Pure text in, word groups out: prompts.py tokenizes and joins the segments.
"""
from __future__ import annotations

import re

from .errors import PromptError

_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "etc", "fig", "figs", "no", "nos", "approx",
                  "mt", "ft", "inc", "ltd", "co", "prof", "gen", "col", "lt", "sgt", "capt", "ca", "cf", "al",
                  "vol", "ed", "rev", "ave", "blvd", "dept", "est", "jan", "feb", "mar", "apr", "jun", "jul",
                  "aug", "sep", "sept", "oct", "nov", "dec", "mon", "tue", "wed", "thu", "fri", "sat", "sun"}
_END = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s|$)")


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`. A full stop ends a sentence unless it closes an abbreviation
    (`Dr.`, `e.g.`, `U.S.`) or an initial (`J.`); a decimal point (`3.5`) is never followed by a
    space, so it never ends one."""
    out, start = [], 0
    for m in _END.finditer(text):
        head = text[start:m.start()].split()
        word = head[-1].lower() if head else ""
        if m.group().startswith(".") and len(m.group().rstrip("\"'”’)]")) == 1:
            if word in _ABBREVIATIONS or "." in word or (len(word) == 1 and word.isalpha()):
                continue
        sentence = text[start:m.end()].strip()
        if sentence:
            out.append(sentence)
        start = m.end()
    tail = text[start:].strip()
    return out + ([tail] if tail else [])


def pieces(words: list[str], counts: list[int], limit: int) -> list[list[int]]:
    """Word-index groups of at most `limit` tokens (`counts[i]`: word i's token count): sentences,
    then clauses (commas, semicolons, colons), then single words, consecutive groups packed while
    they fit. Raises PromptError for a word longer than `limit` on its own."""
    def pack(groups):  # consecutive groups merged while they fit
        out = []
        for g in groups:
            if out and sum(counts[i] for i in out[-1] + g) <= limit:
                out[-1] = out[-1] + g
            else:
                out.append(list(g))
        return out

    def split(group, ends):  # cut after words for which ends(word) is true
        out, cur = [], []
        for i in group:
            cur.append(i)
            if ends(words[i]):
                out.append(cur)
                cur = []
        return out + ([cur] if cur else [])

    sentences, at = [], 0
    for sentence in split_sentences(" ".join(words)):
        n = len(sentence.split())
        sentences.append(list(range(at, at + n)))
        at += n
    result = []
    for sentence in sentences:
        if sum(counts[i] for i in sentence) <= limit:
            result.append(sentence)
            continue
        for clause in split(sentence, lambda w: w.endswith((",", ";", ":"))):
            if sum(counts[i] for i in clause) <= limit:
                result.append(clause)
                continue
            for i in clause:
                if counts[i] > limit:
                    raise PromptError(f"the word {words[i][:40]!r} alone is {counts[i]} tokens; "
                                      f"a segment holds at most {limit}")
                result.append([i])
    return pack(result)
