"""Answer scoring: VQA's answer normalisation, exact match, VQAv2 soft accuracy, token F1.

Every prediction and reference goes through VQA's normalisation before comparison: lower case,
punctuation removed (a decimal point between digits kept), number words zero..ten to digits,
articles (a, an, the) dropped, common contractions restored. So "Three." matches "3" and
"A red circle" matches "red circle", but "The circle is red." does not match "red".
"""

from __future__ import annotations

import re
from collections import Counter

# --- VQA answer normalisation (after the VQA evaluation script, vqaEval.py) ---------------------

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {"arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't",
                 "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
                 "havent": "haven't", "isnt": "isn't", "shouldnt": "shouldn't", "wasnt": "wasn't",
                 "werent": "weren't", "wont": "won't", "wouldnt": "wouldn't", "youre": "you're",
                 "theyre": "they're", "whats": "what's", "im": "i'm", "ive": "i've", "its": "it's"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
          ",", "?", "!", ":", "'", "*", "#", "%", "&", "$"]
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")  # a period not between two digits


def normalize_answer(text: str) -> str:
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    text = _COMMA_IN_NUMBER.sub(r"\1\3", text)  # 1,000 -> 1000
    for p in _PUNCT:
        text = text.replace(p, "" if p == "'" else " ")
    text = _PERIOD.sub(" ", text)
    words = [_NUMBERS.get(w, w) for w in text.split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def exact_match(prediction: str, answer: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(answer))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """min(#references equal to the prediction / 3, 1), after normalisation. (The official
    VQAv2 score averages this over the 10 leave-one-out subsets of its 10 answers; with other
    counts of references that average is not defined, so the plain formula is used.)"""
    pred = normalize_answer(prediction)
    return min(sum(normalize_answer(a) == pred for a in answers) / 3, 1.0)


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref or not common:
        return float(pred == ref)
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: insertions, deletions and substitutions of one character each."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        diag, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            diag, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diag + (x != y))
    return row[-1]


def char_accuracy(prediction: str, answer: str) -> float:
    """1 - edit distance / the answer's length, at least 0, case and outer spaces ignored: how
    much of a word was read when it was not read whole (STOP -> STORM: 0.5)."""
    pred, ref = prediction.strip().casefold(), answer.strip().casefold()
    return max(0.0, 1 - edit_distance(pred, ref) / len(ref)) if ref else float(pred == ref)
