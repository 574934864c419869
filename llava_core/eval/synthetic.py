"""Scoring: the synthetic suite (exact match per question type) and a user's own JSONL of
questions (VQAv2-style soft accuracy).

Answers come from batched greedy generation on the chat template. Every prediction and
reference goes through VQA's answer normalisation before comparison: lower case, punctuation
removed (a decimal point between digits kept), number words zero..ten to digits, articles
(a, an, the) dropped, common contractions restored. So "Three." matches "3" and
"A red circle" matches "red circle", but "The circle is red." does not match "red".

Captions (caption_short, caption_detailed) have no single right wording: they are reported
with exact match *and* token F1 (SQuAD-style, over normalised words), and left out of a
split's "overall", which averages exact match over every other question. Multi-turn samples
are scored on their last answer, with the earlier turns given as the reference answers.

Results: {split: {qtype: {"n", "acc"[, "f1"]}, "overall": {"n", "acc"}}}.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from ..atomic import atomic_write_text
from ..runtime.decode import SamplingParams, generate_tokens

log = logging.getLogger(__name__)

CAPTION_QTYPES = ("caption_short", "caption_detailed")

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


# --- generation --------------------------------------------------------------------------------

def answer_batch(model, processor, conversations: list[list[dict]], images: list[list],
                 max_new_tokens: int = 24) -> list[str]:
    """Greedy answers to a batch of conversations (each ending on a user turn), each with its
    images (one list per conversation, in the order its turns show them)."""
    texts = [processor.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
    enc = processor(text=texts, images=images if any(images) else None, return_tensors="pt", padding=True)
    px = enc.get("pixel_values")
    px = None if px is None else px.to(model.device, model.dtype)
    params = SamplingParams(max_new_tokens=max_new_tokens)
    pad = model.cfg.text.pad_token_id if model.cfg.text.pad_token_id is not None else 0
    rows: list[list[int]] = [[] for _ in conversations]
    for tokens in generate_tokens(model, enc["input_ids"].to(model.device), params, model.cfg.text.eos_token_ids,
                                  px, enc["attention_mask"].to(model.device), pad):
        for r, t in enumerate(tokens.tolist()):
            rows[r].append(t)
    return [processor.tokenizer.decode(row, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()
            for row in rows]


def sample_conversation(sample: dict) -> list[dict]:
    """A synthetic sample's conversation up to its last question, the image in the first user turn."""
    turns = [dict(t) for t in sample["conversation"][:-1]]  # drop the answer being scored
    turns[0]["content"] = [{"type": "image"}, {"type": "text", "text": turns[0]["content"]}]
    return turns


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


# --- synthetic suite ---------------------------------------------------------------------------

def summarize(rows: list[dict]) -> dict:
    """[{qtype, score[, f1]}] -> {qtype: {"n", "acc"[, "f1"]}, "overall": {"n", "acc"}} (captions
    outside overall)."""
    out: dict = {}
    for qtype in sorted({r["qtype"] for r in rows}, key=_qtype_order):
        group = [r for r in rows if r["qtype"] == qtype]
        out[qtype] = {"n": len(group), "acc": sum(r["score"] for r in group) / len(group)}
        if qtype in CAPTION_QTYPES:
            out[qtype]["f1"] = sum(r["f1"] for r in group) / len(group)
    scored = [r for r in rows if r["qtype"] not in CAPTION_QTYPES]
    out["overall"] = {"n": len(scored), "acc": sum(r["score"] for r in scored) / len(scored) if scored else 0.0}
    return out


def _qtype_order(qtype: str):
    from ..data import QTYPES

    return (QTYPES.index(qtype) if qtype in QTYPES else len(QTYPES), qtype)


def evaluate_synthetic(model, processor, splits=("test", "heldout", "shifted"), n_per_split: int = 200,
                       batch_size: int = 8, seed: int = 0, max_new_tokens: int = 24, data_config=None,
                       predictions: list | None = None) -> dict:
    """Exact match per question type on samples 0..n_per_split-1 of each split.

    data_config: the llava_core.data.DataConfig to draw from (its seed is replaced by `seed`);
    None: the default instruct mix rendered at the vision tower's image size. Every scored row
    is appended to `predictions` if a list is given."""
    from dataclasses import replace

    from ..data import DataConfig, make_sample

    cfg = replace(data_config or DataConfig(image_size=model.cfg.vision.image_size), seed=seed)
    results = {}
    for split in splits:
        samples = [make_sample(split, i, cfg) for i in range(n_per_split)]
        rows = []
        for batch in tqdm(list(_batches(samples, batch_size)), desc=f"eval {split}", unit="batch"):
            answers = answer_batch(model, processor, [sample_conversation(s) for s in batch],
                                   [[s["image"]] for s in batch], max_new_tokens)
            for s, pred in zip(batch, answers):
                rows.append({"split": split, "index": len(rows), "qtype": s["qtype"], "task": s["meta"]["tasks"][-1],
                             "question": s["conversation"][-2]["content"], "answer": s["answer"],
                             "prediction": pred, "score": exact_match(pred, s["answer"]),
                             "f1": token_f1(pred, s["answer"])})
        results[split] = summarize(rows)
        log.info("%s: overall exact match %.3f on %d questions", split, results[split]["overall"]["acc"],
                 results[split]["overall"]["n"])
        if predictions is not None:
            predictions.extend(rows)
    return results


# --- a user's JSONL ----------------------------------------------------------------------------

def read_jsonl(path: str | Path) -> list[dict]:
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
    """VQAv2-style soft accuracy on a JSONL file (see read_jsonl) -> {file stem: {qtype: {"n", "acc"}, "overall"}}
    (qtype rows only when lines carry "question_type")."""
    from ..model.processor import load_image

    path = Path(path)
    items = read_jsonl(path)
    rows = []
    for batch in tqdm(list(_batches(items, batch_size)), desc=f"eval {path.name}", unit="batch"):
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


# --- output ------------------------------------------------------------------------------------

def shared_overall(results: dict) -> dict:
    """{split: {"n", "acc"}}: exact match over the scored question types that every split has.

    The held-out split draws only scenes of shapes (its held-out attribute combinations), so it
    has no OCR or document questions; its "overall" then averages easier types than test's. This
    compares splits on the same types, each weighted by its own count."""
    if not results:
        return {}
    shared = set.intersection(*(set(r) for r in results.values())) - {"overall", *CAPTION_QTYPES}
    out = {}
    for split, table in results.items():
        n = sum(table[q]["n"] for q in shared)
        out[split] = {"n": n, "acc": sum(table[q]["n"] * table[q]["acc"] for q in shared) / n if n else 0.0}
    return out


def format_table(results: dict) -> str:
    """Markdown: one row per question type, one column per split, cells 'acc% (n)'; caption rows
    show exact match and token F1, and are not in overall. Where the splits hold different
    question types, a last row gives overall over the types they share (`shared_overall`)."""
    splits = list(results)
    qtypes = sorted({q for s in splits for q in results[s] if q != "overall"}, key=_qtype_order)
    lines = ["| question type | " + " | ".join(splits) + " |", "|---" * (len(splits) + 1) + "|"]
    for q in qtypes + ["overall"]:
        cells = []
        for s in splits:
            r = results[s].get(q)
            if r is None:
                cells.append("–")
            elif "f1" in r:
                cells.append(f"{100 * r['acc']:.1f} / F1 {100 * r['f1']:.1f} ({r['n']})")
            else:
                cells.append(f"{100 * r['acc']:.1f} ({r['n']})")
        name = f"**{q}**" if q == "overall" else q + (" †" if q in CAPTION_QTYPES else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    shared = shared_overall(results)
    if any(shared[s]["n"] != results[s]["overall"]["n"] for s in splits):  # a split has types others lack
        cells = [f"{100 * r['acc']:.1f} ({r['n']})" for r in shared.values()]
        lines.append("| overall, types every split has | " + " | ".join(cells) + " |")
    if any(q in CAPTION_QTYPES for q in qtypes):
        lines.append("\n† exact match / token F1; captions are not counted in overall.")
    return "\n".join(lines)


def save_json(results, path: str | Path) -> None:
    """Write JSON atomically (a temp file in the same folder, then rename)."""
    atomic_write_text(path, json.dumps(results, indent=2, default=str) + "\n")


def save_jsonl(rows: list[dict], path: str | Path) -> None:
    atomic_write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in rows))


# --- command line ------------------------------------------------------------------------------

def run_eval(args: argparse.Namespace) -> dict:
    """The `eval` command: load, score, print the table, write --out / --predictions."""
    from ..default.cache import resolve_model
    from ..checkpoints.loader import load_pretrained
    from ..model.processor import LlavaProcessor

    folder = resolve_model(args.model)
    import torch

    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    model = load_pretrained(folder, dtype=dtype, device=args.device)
    processor = LlavaProcessor.from_pretrained(folder)
    rows: list[dict] = []
    if args.jsonl is not None:
        results = evaluate_jsonl(model, processor, args.jsonl, args.batch_size, args.max_new_tokens, rows)
    else:
        splits = tuple(s.strip() for s in args.splits.split(",") if s.strip())
        results = evaluate_synthetic(model, processor, splits, args.n_per_split, args.batch_size, args.seed,
                                     args.max_new_tokens, predictions=rows)
    print(format_table(results))
    if args.out is not None:
        save_json(results, args.out)
        log.info("wrote %s", args.out)
    if args.predictions is not None:
        save_jsonl(rows, args.predictions)
    return results
