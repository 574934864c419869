"""Scoring a model: the synthetic suite (exact match per question type) and a user's own JSONL
of questions (VQAv2-style soft accuracy).

    metrics.py    VQA answer normalisation, exact match, soft accuracy, token F1
    answers.py    batched greedy answers on the chat template
    synthetic.py  the test / held-out / shifted splits of the synthetic data
    jsonl.py      a JSONL of {image, question, answers}
    report.py     per-type summaries, the markdown table, JSON output
"""

from .answers import answer_batch, sample_conversation
from .jsonl import evaluate_jsonl, read_questions
from .metrics import char_accuracy, exact_match, normalize_answer, token_f1, vqa_accuracy
from .report import CAPTION_QTYPES, format_table, save_json, save_jsonl, shared_overall, summarize
from .synthetic import evaluate_synthetic

__all__ = ["CAPTION_QTYPES", "answer_batch", "char_accuracy", "evaluate_jsonl", "evaluate_synthetic", "exact_match",
           "format_table", "normalize_answer", "read_questions", "sample_conversation", "save_json", "save_jsonl",
           "shared_overall", "summarize", "token_f1", "vqa_accuracy"]
