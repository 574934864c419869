"""The synthetic suite: exact match per question type on the test, held-out and shifted splits.

Answers come from batched greedy generation on the chat template (answers.py) and are scored
after VQA's answer normalisation (metrics.py). Captions are reported with exact match and
token F1 and left out of "overall" (report.py). Multi-turn samples are scored on their last
answer, with the earlier turns given as the reference answers.
"""

from __future__ import annotations

import logging

from tqdm import tqdm

from .answers import answer_batch, batches, sample_conversation
from .metrics import exact_match, token_f1
from .report import summarize

log = logging.getLogger(__name__)


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
        for batch in tqdm(list(batches(samples, batch_size)), desc=f"eval {split}", unit="batch"):
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
