"""What kind of image it is: the questions a person asks before any detail, on every kind of
scene. "What kind of image is this?" -> "a document"; "Is there any text in the image?" -> "no"
on shapes, "yes" on a word or a document. Neither the instruct mix nor the scored suite asks
them; a recipe adds the qtype "kind" to its mix (dataset.make_sample picks the scene's kind
first, a third each)."""

from __future__ import annotations

import random

KIND_QS = ("What kind of image is this?", "What type of image is this?", "What sort of picture is this?",
           "What kind of picture is this?")
ANY_TEXT_QS = ("Is there any text in the image?", "Is anything written in the image?",
               "Does the image contain any text?", "Is there writing in this picture?")
KINDS = ("shapes", "text", "document")  # the scene kinds a "kind" question is asked of
TEXT_KINDS = {"word": "a word", "number": "a number", "letters": "a string of letters"}


def kind_answer(meta: dict) -> str:
    """What the image is, in a few words: a drawing of shapes, a word (number, letters), a document."""
    if meta["kind"] == "shapes":
        return "a drawing of shapes"
    if meta["kind"] == "text":
        return TEXT_KINDS[meta["text_kind"]]
    if meta["kind"] == "document":
        return "a document"
    raise ValueError(f"kind_answer: unknown scene kind {meta['kind']!r}; expected one of {KINDS}")


def ask_kind(rng: random.Random, meta: dict):
    """One question, (question, answer, task): what kind of image (half the time), else whether
    it holds text."""
    if rng.random() < 0.5:
        return rng.choice(KIND_QS), kind_answer(meta), "kind"
    return rng.choice(ANY_TEXT_QS), "no" if meta["kind"] == "shapes" else "yes", "any_text"
