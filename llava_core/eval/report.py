"""Results tables: rows of scored answers -> per-type accuracy, the markdown table, JSON files.

Results: {split: {qtype: {"n", "acc"[, "f1"]}, "overall": {"n", "acc"}}}. Captions
(caption_short, caption_detailed) have no single right wording: they are reported with exact
match *and* token F1 and left out of a split's "overall".
"""

from __future__ import annotations

import json
from pathlib import Path

from ..atomic import atomic_write_text

CAPTION_QTYPES = ("caption_short", "caption_detailed")


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
