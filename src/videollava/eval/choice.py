"""Multiple-choice answers: which option letter a free-form reply picks, and MMBench's circular scoring.

The reference scripts fall back to a random letter (ScienceQA) or to a GPT call (MMBench) when a
reply names no option; here such a reply picks nothing and counts as wrong, so a score never
depends on chance or on a remote model, and the number of replies that picked nothing is reported.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
ANSWER_WITH_LETTER = "Answer with the option's letter from the given choices directly."

_THE_ANSWER_IS = re.compile(r"answer is:?\s*\(?([A-Z])\)?(?![A-Za-z])", re.IGNORECASE)
_LEADING = re.compile(r"^\(?([A-Z])\)?(?:[.:)\s]|$)")
_PAREN = re.compile(r"\(([A-Z])\)")


def extract_choice(reply: str, options: Sequence[str]) -> str | None:
    """The letter a reply picks among ``options`` (their texts, lettered A, B, ... in order).

    In order: the reply is a letter ("B", "(B)", "B.", "B. text"); "the answer is B"; one "(B)"; the text of exactly one option, with
    the longest match winning ("red circle" over "circle"). None when nothing decides it.
    """
    letters = LETTERS[: len(options)]
    text = reply.strip()
    if not text:
        return None
    match = _LEADING.match(text)
    if match and match.group(1) in letters:
        return match.group(1)
    for pattern in (_THE_ANSWER_IS, _PAREN):
        found = {m.upper() for m in pattern.findall(text)} & set(letters)
        if len(found) == 1:
            return found.pop()
    lowered = f" {_words(text)} "
    hits = [(len(_words(o)), letter) for letter, o in zip(letters, options, strict=True) if _words(o)]
    hits = [(n, letter) for n, letter in hits if f" {_words(options[letters.index(letter)])} " in lowered]
    if hits:
        longest = max(n for n, _ in hits)
        best = [letter for n, letter in hits if n == longest]
        if len(best) == 1:
            return best[0]
    return None


def _words(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def options_block(options: Sequence[str]) -> str:
    """Options as the LLaVA-1.5 MMBench prompt lists them: "A. text" per line."""
    return "\n".join(f"{LETTERS[i]}. {text}" for i, text in enumerate(options))


def rotations(options: Sequence[str]) -> list[list[int]]:
    """MMBench's circular evaluation: the option order shifted by 0..n-1 places.

    Each entry lists, for each shown position, the index of the original option placed there.
    """
    n = len(options)
    return [[(shift + i) % n for i in range(n)] for shift in range(n)]


def circular_correct(picks: Sequence[str | None], answers: Sequence[str]) -> bool:
    """A question counts only when every rotation is answered right."""
    return len(picks) > 0 and all(p is not None and p == a for p, a in zip(picks, answers, strict=True))
