"""Scoring: answer normalisation, VQA soft accuracy, JSONL checks, and the per-type tables on a
tiny random checkpoint (with known answers fed in, and with real generation)."""

import argparse
import json

import numpy as np
import pytest
from PIL import Image

from llava_core import eval as ev
from llava_core.checkpoints.loader import load_pretrained
from llava_core.data import DataConfig, make_sample
from llava_core.eval import synthetic
from llava_core.model.processor import LlavaProcessor
from llava_core.runtime.generate import generate


@pytest.fixture(scope="module")
def tiny(tiny_ckpt):
    return load_pretrained(tiny_ckpt), LlavaProcessor.from_pretrained(tiny_ckpt)


@pytest.fixture
def jsonl(tmp_path):
    """A JSONL file with two images beside it, one referenced by a relative path."""
    for i, colour in enumerate(["red", "blue"]):
        Image.new("RGB", (80, 60), colour).save(tmp_path / f"im{i}.png")
    lines = [{"image": "im0.png", "question": "What colour is it?", "answers": ["red", "red", "Red."],
              "question_type": "colour"},
             {"image": str(tmp_path / "im1.png"), "question": "How many?", "answers": [{"answer": "2"}],
              "question_type": "count"},
             {"image": "im1.png", "question": "Is it blue?", "answers": "yes", "question_type": "colour"}]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    return path


# --- scoring --------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction, answer, same", [
    ("Three.", "3", True), ("A red circle", "red circle", True), ("  RED!\n", "red", True),
    ("42.50", "42.50", True), ("1,000", "1000", True), ("the top left", "top left", True),
    ("dont", "don't", True), ("The circle is red.", "red", False), ("42.5", "42.50", False),
    ("left", "right", False), ("", "no", False),
])
def test_exact_match_normalisation(prediction, answer, same):
    assert ev.exact_match(prediction, answer) == float(same)


@pytest.mark.parametrize("prediction, answers, score", [
    ("cat", ["dog", "dog", "bird"], 0.0),
    ("cat", ["cat", "dog", "dog", "bird"], 1 / 3),
    ("Cat.", ["cat", "the cat", "dog"], 2 / 3),
    ("two", ["2", "2", "2"], 1.0),
    ("2", ["2"] * 7 + ["3"] * 3, 1.0),
])
def test_vqa_soft_accuracy(prediction, answers, score):
    assert ev.vqa_accuracy(prediction, answers) == pytest.approx(score)


def test_char_accuracy_is_one_less_the_edit_distance_per_character():
    assert ev.metrics.edit_distance("kitten", "sitting") == 3  # two substitutions, one insertion
    assert ev.char_accuracy("STORM", "STOP") == 0.5  # P -> R, M inserted: 2 edits over 4 characters
    assert ev.char_accuracy(" stop ", "STOP") == 1.0  # case and outer spaces ignored
    assert ev.char_accuracy("EOKZZ", "EDLEZX") == pytest.approx(1 - 4 / 6)
    assert ev.char_accuracy("a much longer answer", "STOP") == 0.0  # floored, not negative
    assert ev.char_accuracy("", "") == 1.0 and ev.char_accuracy("x", "") == 0.0


def test_token_f1():
    assert ev.token_f1("A red circle and a blue square.", "a red circle and a blue square") == 1.0
    assert ev.token_f1("red circle", "red circle and blue square") == pytest.approx(2 * 1 * 0.4 / 1.4)
    assert ev.token_f1("", "red") == 0.0


# --- JSONL ----------------------------------------------------------------------------------------

def test_read_jsonl_resolves_paths_and_answer_forms(jsonl):
    items = ev.read_questions(jsonl)
    assert [it["line"] for it in items] == [1, 2, 3]
    assert items[0]["image"] == jsonl.parent / "im0.png"
    assert items[1]["answers"] == ["2"] and items[2]["answers"] == ["yes"]


@pytest.mark.parametrize("line, error, fragment", [
    ('{"image": "im0.png", "question": "Q?", "answers": ["a"]', ValueError, "not valid JSON"),
    ('{"image": "im0.png", "question": "Q?"}', ValueError, "missing 'answers'"),
    ('{"image": "im0.png", "question": "Q?", "answers": []}', ValueError, "non-empty list"),
    ('{"image": "im0.png", "question": "", "answers": ["a"]}', ValueError, "non-empty string"),
    ('["im0.png", "Q?"]', ValueError, "expected an object"),
    ('{"image": "nope.png", "question": "Q?", "answers": ["a"]}', FileNotFoundError, "nope.png"),
])
def test_bad_jsonl_line_is_named(jsonl, line, error, fragment):
    jsonl.write_text(jsonl.read_text().rstrip("\n") + "\n" + line + "\n")
    with pytest.raises(error) as info:
        ev.read_questions(jsonl)
    assert f"{jsonl}:4" in str(info.value) and fragment in str(info.value)


def test_empty_jsonl(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no questions"):
        ev.read_questions(tmp_path / "e.jsonl")


# --- tables on a tiny checkpoint -----------------------------------------------------------------

def test_synthetic_table_adds_up_with_known_answers(tiny, monkeypatch, tmp_path):
    """Feed the right answer (restyled: capitalised, 'The ...', a full stop) to every other question
    and a wrong one to the rest; the table must count and average exactly that."""
    model, processor = tiny
    splits, n = ("test", "heldout", "shifted"), 12
    cfg = DataConfig(image_size=model.cfg.vision.image_size)
    samples = [make_sample(s, i, cfg) for s in splits for i in range(n)]
    fed = iter([f"The {s['answer'].capitalize()}." if k % 2 == 0 else "wrong" for k, s in enumerate(samples)])
    seen = []

    def fake(model, processor, conversations, images, max_new_tokens=24):
        seen.extend(conversations)
        assert all(len(im) == 1 for im in images)
        return [next(fed) for _ in conversations]
    monkeypatch.setattr(synthetic, "answer_batch", fake)  # the name evaluate_synthetic calls
    results = ev.evaluate_synthetic(model, processor, splits, n_per_split=n, batch_size=5)

    assert [c[-1]["role"] for c in seen] == ["user"] * len(samples)
    assert seen[0][0]["content"][0] == {"type": "image"}
    for j, split in enumerate(splits):
        rows = [(s["qtype"], k % 2 == 0) for k, s in enumerate(samples) if j * n <= k < (j + 1) * n]
        table = results[split]
        assert sum(v["n"] for q, v in table.items() if q != "overall") == n
        for qtype in {q for q, _ in rows}:
            hits = [ok for q, ok in rows if q == qtype]
            assert table[qtype] == pytest.approx({**table[qtype], "n": len(hits), "acc": sum(hits) / len(hits)})
        scored = [ok for q, ok in rows if q not in ev.CAPTION_QTYPES]
        assert table["overall"] == pytest.approx({"n": len(scored), "acc": sum(scored) / len(scored)})
    text = ev.format_table(results)
    assert text.splitlines()[0] == "| question type | test | heldout | shifted |"
    assert "| **overall** |" in text
    ev.save_json(results, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == results
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_real_generation_end_to_end(tiny, jsonl):
    model, processor = tiny
    rows = []
    results = ev.evaluate_synthetic(model, processor, ("test",), n_per_split=4, batch_size=3,
                                    max_new_tokens=3, predictions=rows)
    assert sum(v["n"] for q, v in results["test"].items() if q != "overall") == 4 == len(rows)
    assert all(isinstance(r["prediction"], str) for r in rows)

    rows = []
    results = ev.evaluate_jsonl(model, processor, jsonl, batch_size=2, max_new_tokens=3, predictions=rows)
    assert set(results) == {"mine"}
    assert results["mine"]["colour"]["n"] == 2 and results["mine"]["count"]["n"] == 1
    assert results["mine"]["overall"]["n"] == 3 and [r["line"] for r in rows] == [1, 2, 3]


def test_answer_batch_is_assistant_generate_for_one_turn(tiny):
    model, processor = tiny
    questions = ["What is it?", "Read all the text in the image please."]
    images = [(np.random.default_rng(i).random((50, 70, 3)) * 255).astype(np.uint8) for i in range(2)]
    convs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}] for q in questions]
    got = ev.answer_batch(model, processor, convs, [[im] for im in images], max_new_tokens=6)
    assert got == generate(model, processor, questions, images, max_new_tokens=6)


def test_run_eval_command(tiny_ckpt, jsonl, tmp_path, capsys):
    from llava_core.cli.eval import add_eval_args, run_eval

    parser = argparse.ArgumentParser()
    add_eval_args(parser)
    with pytest.raises(SystemExit):  # --suite or --jsonl is required
        parser.parse_args([str(tiny_ckpt)])
    args = parser.parse_args([str(tiny_ckpt), "--jsonl", str(jsonl), "--max-new-tokens", "2",
                              "--out", str(tmp_path / "out" / "results.json"),
                              "--predictions", str(tmp_path / "preds.jsonl")])
    results = run_eval(args)
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == results
    assert len((tmp_path / "preds.jsonl").read_text().splitlines()) == 3
    assert "| **overall** |" in capsys.readouterr().out


def test_shared_overall_compares_splits_on_the_types_they_share():
    """Split b lacks ocr: its overall is over colour and yesno alone, and so must the shared row be,
    for both splits, weighted by each type's count; a table of like splits gets no such row."""
    a = {"colour": {"n": 4, "acc": 0.5}, "yesno": {"n": 6, "acc": 1.0}, "ocr": {"n": 10, "acc": 0.0},
         "caption_short": {"n": 2, "acc": 0.0, "f1": 0.5}, "overall": {"n": 20, "acc": 0.4}}
    b = {"colour": {"n": 2, "acc": 1.0}, "yesno": {"n": 2, "acc": 0.0}, "overall": {"n": 4, "acc": 0.5}}
    shared = ev.shared_overall({"a": a, "b": b})
    assert shared["a"] == pytest.approx({"n": 10, "acc": 0.8})  # (2 + 6) / 10: ocr and captions out
    assert shared["b"] == pytest.approx({"n": 4, "acc": 0.5})
    last = ev.format_table({"a": a, "b": b}).split("\n\n")[0].splitlines()[-1]
    assert last == "| overall, types every split has | 80.0 (10) | 50.0 (4) |"
    assert "types every split has" not in ev.format_table({"a": a, "b": dict(a)})
    no_captions = {q: v for q, v in a.items() if q != "caption_short"}  # captions are not scored
    assert "types every split has" not in ev.format_table({"a": a, "b": no_captions})
    assert ev.shared_overall({}) == {}


def test_natural_suite_asks_the_natural_questions(tiny_ckpt, monkeypatch, tmp_path):
    """`--suite natural` scores the same splits drawn from NATURAL_MIX: only list, presence and
    absent questions, each with the answer the sample holds (checked via the predictions file)."""
    from llava_core.cli.eval import add_eval_args, run_eval

    def fake(model, processor, conversations, images, max_new_tokens=24):
        return ["yes"] * len(conversations)
    monkeypatch.setattr(synthetic, "answer_batch", fake)
    parser = argparse.ArgumentParser()
    add_eval_args(parser)
    args = parser.parse_args([str(tiny_ckpt), "--suite", "natural", "-n", "30", "--splits", "test,heldout",
                              "--predictions", str(tmp_path / "p.jsonl")])
    results = run_eval(args)
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert {r["qtype"] for r in rows} == {"list", "presence", "absent"} and len(rows) == 60
    for r in rows:  # "yes" is right exactly where the answer is yes
        assert r["score"] == (r["answer"] == "yes")
    yes = [r["answer"] == "yes" for r in rows if r["split"] == "test"]
    assert results["test"]["overall"]["acc"] == pytest.approx(sum(yes) / len(yes)) and 0 < sum(yes) < 30
