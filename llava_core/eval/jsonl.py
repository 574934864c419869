"""A user's own questions: a JSONL of {image, question, answers}, scored by VQAv2 soft accuracy."""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from .answers import answer_batch, batches
from .metrics import vqa_accuracy
from .report import summarize


def read_questions(path: str | Path) -> list[dict]:
    """Lines {"image": path (relative to the file's folder allowed), "question": str,
    "answers": [str, ...] (or one str, or VQA's [{"answer": str}, ...])[, "question_type": str]}.
    Every bad line is a ValueError (or FileNotFoundError for its image) naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such JSONL file")
    items = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected an object with image, question and answers")
        for key in ("image", "question", "answers"):
            if key not in d:
                raise ValueError(f"{where}: missing {key!r}")
        if not isinstance(d["question"], str) or not d["question"].strip():
            raise ValueError(f"{where}: 'question' must be a non-empty string")
        answers = d["answers"]
        answers = [answers] if isinstance(answers, str) else answers
        if isinstance(answers, list):
            answers = [a.get("answer") if isinstance(a, dict) else a for a in answers]
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"{where}: 'answers' must be a non-empty list of strings")
        image = Path(d["image"]).expanduser()
        image = image if image.is_absolute() else path.parent / image
        if not image.is_file():
            raise FileNotFoundError(f"{where}: image {d['image']!r} not found (looked at {image})")
        qtype = d.get("question_type", d.get("type", "all"))
        items.append({"line": n, "image": image, "question": d["question"].strip(), "answers": answers,
                      "qtype": str(qtype)})
    if not items:
        raise ValueError(f"{path}: no questions")
    return items


def evaluate_jsonl(model, processor, path: str | Path, batch_size: int = 8, max_new_tokens: int = 24,
                   predictions: list | None = None) -> dict:
    """VQAv2-style soft accuracy on a JSONL file (see read_questions) -> {file stem: {qtype: {"n", "acc"}, "overall"}}
    (qtype rows only when lines carry "question_type")."""
    from ..model.processor import load_image

    path = Path(path)
    items = read_questions(path)
    rows = []
    for batch in tqdm(list(batches(items, batch_size)), desc=f"eval {path.name}", unit="batch"):
        convs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": it["question"]}]}]
                 for it in batch]
        answers = answer_batch(model, processor, convs, [[load_image(it["image"])] for it in batch], max_new_tokens)
        for it, pred in zip(batch, answers):
            rows.append({"line": it["line"], "qtype": it["qtype"], "question": it["question"],
                         "answers": it["answers"], "prediction": pred,
                         "score": vqa_accuracy(pred, it["answers"])})
    summary = summarize(rows)
    if set(summary) == {"all", "overall"}:
        del summary["all"]
    if predictions is not None:
        predictions.extend(rows)
    return {path.stem: summary}
