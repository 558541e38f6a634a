"""VQA accuracy as the VQA challenge defines it, with its answer normalisation.

An answer scores min(#humans who gave it / 3, 1), averaged over the ten ways of leaving one of the
ten human answers out (so 3 matching humans give 0.9 on average, not 1). Before comparing, every
answer, the prediction and the humans' alike, goes through the challenge's normalisation:

1. lower case, newlines and tabs to spaces, commas and question marks dropped, "'s" split off;
2. punctuation: a mark next to a space, or any mark when the text holds a digit-comma-digit
   number, is deleted, otherwise replaced by a space; a full stop not followed by a digit is
   dropped ("2.5" keeps its point);
3. words: number words up to ten become digits ("none" becomes "0"), the articles a, an and the
   go, and apostrophe-less contractions get their apostrophe back ("dont" -> "don't").

Normalising the human answers every time (as the evaluation server's answer processor and the
TextVQA scorer do) rather than only when they disagree changes nothing for ten identical answers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from videollava.eval.metrics import NUMBER_WORDS

_PUNCTUATION = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# The challenge's expression, kept as published: "(?!<=" is a negative look-ahead for the literal
# "<=", not a look-behind, so in effect a full stop is dropped unless a digit follows it.
_FULL_STOP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_NUMBER_WORDS = {"none": "0", **NUMBER_WORDS}  # the challenge's table: "none" counts as 0 too
_ARTICLES = frozenset({"a", "an", "the"})

# Contractions written without their apostrophes, and how the challenge restores them. Grouped by
# canonical form; keys that cannot occur after lower-casing (e.g. "Im") are kept for fidelity.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip


def process_punctuation(text: str) -> str:
    """Step 2 of the normalisation (see the module docstring)."""
    out = text
    has_number_with_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in _PUNCTUATION:
        if f"{mark} " in text or f" {mark}" in text or has_number_with_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _FULL_STOP.sub("", out)


def process_digit_article(text: str) -> str:
    """Step 3: number words to digits, articles out, contractions restored."""
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_vqa_answer(text: str) -> str:
    """The challenge's normalised form of an answer (all three steps)."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """min(#matching humans / 3, 1) averaged over the leave-one-out subsets of the human answers.

    Published for ten answers (10 choose 9 subsets); any number of at least one is accepted.
    """
    if not human_answers:
        raise ValueError("VQA accuracy needs at least one human answer")
    pred = normalize_vqa_answer(prediction)
    humans = [normalize_vqa_answer(a) for a in human_answers]
    if len(humans) == 1:
        return float(humans[0] == pred)
    matches = sum(h == pred for h in humans)
    total = 0.0
    for left_out in humans:
        others = matches - (left_out == pred)
        total += min(1.0, others / 3)
    return total / len(humans)
