"""The synthetic data generator: determinism, split hygiene, balance, answers vs scene, rendering."""

import hashlib
import re
from collections import Counter, defaultdict

import numpy as np
import pytest
from PIL import Image

from llava_core.data import (COLOURS, HELDOUT_PAIRS, INSTRUCT_MIX, QTYPES, SHAPES, DataConfig, ShiftConfig,
                             SyntheticDataset, caption_pairs, make_sample, save_grid)
from llava_core.data.__main__ import main as cli_main
from llava_core.data.grid import grid_size
from llava_core.data.questions import SHAPE_ASKERS
from llava_core.data.scene import layout_key
from llava_core.data.vocab import CELL_NAMES, CELL_PHRASES, PLURALS, TEXT_BACKGROUNDS

N = 2000
SHAPE_MIX = {k: 1.0 for k in SHAPE_ASKERS}
SHAPE_MIX["multiturn"] = 1.0


def _hash(img: Image.Image) -> str:
    return hashlib.md5(img.tobytes()).hexdigest()


def _scene(meta: dict) -> str:
    return repr({k: v for k, v in meta.items() if k != "tasks"})


@pytest.fixture(scope="module")
def train():
    cfg = DataConfig()
    return [make_sample("train", i, cfg) for i in range(N)]


@pytest.fixture(scope="module")
def test_split():
    cfg = DataConfig()
    return [make_sample("test", i, cfg) for i in range(N)]


@pytest.fixture(scope="module")
def train_shapes():
    cfg = DataConfig(mix=SHAPE_MIX)
    samples = [make_sample("train", i, cfg) for i in range(N)]
    return [s for s in samples if s["meta"]["kind"] == "shapes"]  # multiturn may be about text


@pytest.mark.parametrize("split", ["train", "validation", "test", "heldout", "shifted"])
def test_deterministic(split):
    for i in (0, 7, 123):
        a, b = make_sample(split, i, DataConfig()), make_sample(split, i, DataConfig())
        assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"])), (split, i)
        assert (a["conversation"], a["qtype"], a["answer"], a["meta"]) == \
               (b["conversation"], b["qtype"], b["answer"], b["meta"])
    ds = SyntheticDataset(split, 5, DataConfig(), start=3)
    assert _hash(ds[2]["image"]) == _hash(make_sample(split, 5, DataConfig())["image"])  # no state between samples


def test_seed_changes_stream():
    a, b = make_sample("train", 0, DataConfig(seed=0)), make_sample("train", 0, DataConfig(seed=1))
    assert (_hash(a["image"]), a["conversation"]) != (_hash(b["image"]), b["conversation"])


def test_splits_disjoint(train, test_split):
    assert not {_hash(s["image"]) for s in train} & {_hash(s["image"]) for s in test_split}
    assert not {_scene(s["meta"]) for s in train} & {_scene(s["meta"]) for s in test_split}
    keys = lambda ss: {layout_key([(o["cell"], o["colour"], o["shape"], o["size"]) for o in s["meta"]["objects"]])
                       for s in ss if s["meta"]["kind"] == "shapes"}
    assert not keys(train) & keys(test_split)
    texts = lambda ss: {(s["meta"]["text"], s["meta"]["text_colour"], s["meta"]["background"])
                        for s in ss if s["meta"]["kind"] == "text"}
    assert not texts(train) & texts(test_split)


def test_heldout_pairs(train_shapes):
    held = set(HELDOUT_PAIRS)
    mentions = [f"{c} {s}" for c, s in HELDOUT_PAIRS]
    for s in train_shapes:
        assert not {(o["colour"], o["shape"]) for o in s["meta"]["objects"]} & held
        text = " ".join(t["content"] for t in s["conversation"]).lower()
        assert not any(re.search(rf"\b{m}\b", text) for m in mentions), text
    cfg = DataConfig()
    for i in range(300):
        s = make_sample("heldout", i, cfg)
        assert s["meta"]["kind"] == "shapes"
        assert {(o["colour"], o["shape"]) for o in s["meta"]["objects"]} & held


def test_yesno_balance():
    cfg = DataConfig(mix={"yesno": 1.0})
    answers = Counter(make_sample("train", i, cfg)["answer"] for i in range(N))
    assert set(answers) == {"yes", "no"}
    assert abs(answers["yes"] / N - 0.5) <= 0.05, answers


def test_every_qtype_and_task(train):
    assert {s["qtype"] for s in train} == set(INSTRUCT_MIX)  # the scored suite's mix
    assert set(QTYPES) - set(INSTRUCT_MIX) == {"list", "presence", "absent", "kind"}  # recipes add these
    tasks = {t for s in train for t in s["meta"]["tasks"]}
    for task in ("count_all", "count_shape", "count_colour", "position_where", "position_lr", "position_tb",
                 "yesno_exists", "yesno_attribute", "yesno_side", "yesno_count", "ocr_read", "ocr_colour",
                 "ocr_length", "doc_title", "doc_total", "doc_value", "doc_rows"):
        assert task in tasks, task


def test_paraphrase_variety(train):
    questions = defaultdict(set)
    for s in train:
        if s["qtype"] != "multiturn":
            questions[s["meta"]["tasks"][0]].add(s["conversation"][0]["content"])
    for task, qs in questions.items():
        assert len(qs) >= 3, (task, qs)


def test_sample_format(train):
    for s in train[:300]:
        conv = s["conversation"]
        assert s["image"].mode == "RGB" and s["image"].size == (224, 224)
        assert [t["role"] for t in conv] == ["user", "assistant"] * (len(conv) // 2)
        assert conv[-1]["content"] == s["answer"] and len(s["meta"]["tasks"]) == len(conv) // 2
        assert (2 <= len(conv) // 2 <= 3) if s["qtype"] == "multiturn" else len(conv) == 2
        assert "<image>" not in conv[0]["content"]


def _find(objs, colour=None, shape=None, phrase=None):
    hits = [o for o in objs if (colour is None or o["colour"] == colour) and (shape is None or o["shape"] == shape)
            and (phrase is None or CELL_PHRASES[o["cell"]] == phrase)]
    assert len(hits) == 1, (colour, shape, phrase, objs)
    return hits[0]


_PAIR = re.compile(rf"\b({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})\b")
_PHRASE = re.compile("|".join(sorted(CELL_PHRASES, key=len, reverse=True)))


def _expected(task: str, q: str, objs: list) -> str | None:
    """The answer recomputed from the scene alone; None where this check does not apply."""
    words = set(re.findall(r"[a-z]+", q.lower()))
    phrase = (_PHRASE.search(q) or [None])[0]
    pair = _PAIR.search(q)
    if task == "count_all":
        return str(len(objs))
    if task == "count_shape":
        shape = next(s for s in SHAPES if PLURALS[s] in words)
        return str(sum(o["shape"] == shape for o in objs))
    if task == "count_colour":
        colour = next(c for c in COLOURS if c in words)
        return str(sum(o["colour"] == colour for o in objs))
    if task == "colour":
        return _find(objs, shape=next(s for s in SHAPES if s in words), phrase=phrase)["colour"]
    if task == "shape":
        return _find(objs, colour=next(c for c in COLOURS if c in words), phrase=phrase)["shape"]
    if task == "size":
        return _find(objs, *pair.groups())["size"]
    if task == "position_where":
        return _find(objs, *pair.groups())["position"]
    if task in ("position_lr", "position_tb"):
        o = _find(objs, *pair.groups())
        return CELL_NAMES[o["cell"]].split()[0 if task == "position_tb" else -1]
    if task == "yesno_exists":
        return "yes" if any((o["colour"], o["shape"]) == pair.groups() for o in objs) else "no"
    if task == "yesno_attribute":
        o = _find(objs, shape=next(s for s in SHAPES if s in words))
        return "yes" if o["colour"] in words else "no"
    if task == "yesno_side":
        side = next(w for w in ("left", "right", "top", "bottom") if w in words)
        return "yes" if side in CELL_NAMES[_find(objs, *pair.groups())["cell"]].split() else "no"
    if task == "yesno_count":
        n = int(re.search(r"\d+", q).group())
        return "yes" if n == len(objs) else "no"
    if task in ("list_shapes", "list_colours"):  # each value once, in the order objects come
        key = task.split("_")[1][:-1]
        firsts = {}
        for i, o in enumerate(objs):
            firsts.setdefault(o[key], i)
        items = sorted(firsts, key=firsts.get)
        return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"
    if task in ("presence_shape", "presence_colour"):
        named = [w for w in words if w in (SHAPES if task == "presence_shape" else COLOURS)]
        assert len(named) == 1, q
        return "yes" if any(named[0] in (o["shape"], o["colour"]) for o in objs) else "no"
    if task in ("absent_shape", "absent_colour"):
        named = [w for w in words if w in (SHAPES if task == "absent_shape" else COLOURS)]
        assert len(named) == 1 and all(named[0] not in (o["shape"], o["colour"]) for o in objs), (q, objs)
        return f"There is no {named[0]}{' object' if task == 'absent_colour' else ''}."
    if task == "caption_detailed":
        body = "".join(f"a {o['size']} {o['colour']} {o['shape']} {CELL_PHRASES[o['cell']]}" for o in objs)
        return body  # compared after stripping the joining words, below
    return None


def test_answers_match_scene(train_shapes):
    checked = _check_answers(train_shapes)
    assert len(checked) >= 21
    for task in ("list_shapes", "list_colours", "presence_shape", "presence_colour", "absent_shape",
                 "absent_colour"):
        assert checked[task] >= 20, (task, checked)


def test_presence_is_balanced():
    """Presence answers are decided by a fair coin, as yes/no's are: "yes" alone is worth half."""
    answers = Counter(make_sample("train", i, DataConfig(mix={"presence": 1.0}))["answer"] for i in range(400))
    assert set(answers) == {"yes", "no"} and abs(answers["yes"] / 400 - 0.5) <= 0.08, answers


def test_packed_samples():
    """turns=k: up to k different questions about one image, every answer true of the scene,
    deterministic; turns=1 is the plain stream (the splits' samples do not move)."""
    cfg = DataConfig()
    packed = [make_sample("train", i, cfg, turns=8) for i in range(300)]
    again = make_sample("train", 17, cfg, turns=8)
    assert (again["conversation"], again["meta"]) == (packed[17]["conversation"], packed[17]["meta"])
    assert make_sample("test", 5, cfg, turns=1)["conversation"] == make_sample("test", 5, cfg)["conversation"]
    kinds = Counter(s["meta"]["kind"] for s in packed if s["independent"])
    assert set(kinds) == {"shapes", "text", "document"} and kinds["shapes"] > kinds["text"], kinds
    assert any(not s["independent"] and s["qtype"] == "multiturn" for s in packed)
    for s in packed:
        qs = [m["content"] for m in s["conversation"][::2]]
        assert len(qs) == len(set(qs)) and 1 <= len(qs) <= 8, qs
    shapes = [s for s in packed if s["independent"] and s["meta"]["kind"] == "shapes"]
    assert sum(len(s["meta"]["tasks"]) for s in shapes) >= 6 * len(shapes)  # most scenes give 8
    assert len(_check_answers(shapes)) >= 12
    with pytest.raises(ValueError, match="turns=0"):
        make_sample("train", 0, cfg, turns=0)


def test_the_shipped_recipes_question_streams_do_not_move():
    """`llava-core train --replay weights/training.json` reproduces the shipped weights only if
    stages 2-3 draw the same questions: a pinned digest of their first 60 packed samples'
    conversations (text only: rendering may differ with the installed fonts). A generator change
    that moves them must ship new weights, or keep the old stream behind a zero weight."""
    from llava_core.train.recipe import default_recipe

    r, h = default_recipe(), hashlib.sha256()
    for mix in (r.stage2.mix, r.stage3.mix):
        for i in range(60):
            s = make_sample("train", i, DataConfig(mix=dict(mix)), turns=8)
            h.update(repr((s["qtype"], s["conversation"])).encode())
    assert h.hexdigest()[:16] == "6e31b8607a6c2224"


def test_kind_questions_answer_what_the_scene_is():
    """qtype "kind" ("What kind of image is this?", "Is there any text in the image?") on every
    scene kind, one question a sample or packed among the others, each answer true of the scene;
    a mix that weighs it 0 draws exactly the samples of a mix without it (shipped runs replay)."""
    from llava_core.data.kind import ANY_TEXT_QS, KIND_QS, TEXT_KINDS

    want_kind = {"shapes": lambda m: "a drawing of shapes", "document": lambda m: "a document",
                 "text": lambda m: TEXT_KINDS[m["text_kind"]]}
    seen = Counter()
    single = [make_sample(split, i, DataConfig(mix={"kind": 1.0})) for split in ("train", "shifted") for i in range(60)]
    packed = [make_sample("train", i, DataConfig(mix={**INSTRUCT_MIX, "kind": 0.5}), turns=8) for i in range(120)]
    for is_packed, s in [(False, s) for s in single] + [(True, s) for s in packed]:
        for k, task in enumerate(s["meta"]["tasks"]):
            q, a = s["conversation"][2 * k]["content"], s["conversation"][2 * k + 1]["content"]
            if task == "kind":
                assert q in KIND_QS and a == want_kind[s["meta"]["kind"]](s["meta"]), (q, a, s["meta"]["kind"])
            elif task == "any_text":
                assert q in ANY_TEXT_QS and a == ("no" if s["meta"]["kind"] == "shapes" else "yes"), (q, a)
            else:
                assert is_packed, task  # a one-question "kind" sample asks nothing else
                continue
            seen[(is_packed, s["meta"]["kind"], task)] += 1
    assert len(seen) == 12 and min(seen.values()) >= 3, seen  # single and packed, 3 kinds, 2 tasks
    for mix in (INSTRUCT_MIX, {"ocr": 1.0, "document": 1.0, "colour": 1.0}):
        for turns in (1, 8):
            for i in range(40):
                a, b = make_sample("train", i, DataConfig(mix=dict(mix)), turns), \
                    make_sample("train", i, DataConfig(mix={**mix, "kind": 0.0}), turns)
                assert (a["conversation"], _hash(a["image"])) == (b["conversation"], _hash(b["image"]))


def _check_answers(samples) -> Counter:
    checked = Counter()
    for s in samples:
        objs, conv = s["meta"]["objects"], s["conversation"]
        for k, task in enumerate(s["meta"]["tasks"]):
            q, a = conv[2 * k]["content"], conv[2 * k + 1]["content"]
            want = _expected(task, q, objs)
            if task == "caption_detailed":
                assert a.startswith(f"There {'is' if len(objs) == 1 else 'are'} {len(objs)} shape")
                assert re.sub(r"^There [a-z]+ \d+ shapes?: |, | and |\.$", "", a) == want, a
            elif task == "relation":
                ref = _find(objs, *_PAIR.search(q).groups())
                axis, line, sign = {"left of": ("cx", "row", -1), "right of": ("cx", "row", 1),
                                    "above": ("cy", "col", -1), "below": ("cy", "col", 1)}[
                    re.search("left of|right of|above|below", q).group()]
                # every object on ref's row (or column) on that side, nearest first
                ahead = sorted((sign * (o[axis] - ref[axis]), f"{o['colour']} {o['shape']}") for o in objs
                               if o[line] == ref[line] and sign * (o[axis] - ref[axis]) > 0)
                assert ahead and a == ahead[0][1], (q, a, objs)
            elif want is not None:
                assert a == want, (task, q, a, objs)
            checked[task] += 1
    return checked


def test_mirror_twins_are_true_of_the_mirrored_scene():
    """A mirrored packed scene: every answer checks against the mirrored objects (relations by
    their mirrored centres), its pixels sit where the objects now say, left/right answers
    swap and nothing else does, the either-or options keep their order, and mirroring twice
    gives the sample back. Words and documents are refused."""
    from llava_core.data.mirror import mirror_sample, swap_sides
    from llava_core.data.questions import LR_QS

    cfg = DataConfig()
    packed = [make_sample("train", i, cfg, turns=8) for i in range(120)]
    shapes = [s for s in packed if s["meta"]["kind"] == "shapes"]
    twins = [mirror_sample(s) for s in shapes]
    checked = _check_answers(twins)
    assert checked["position_lr"] >= 5 and checked["relation"] >= 5 and checked["caption_detailed"] >= 3, checked
    swapped = 0
    for s, m in zip(shapes, twins):
        px = m["image"].load()
        for o in m["meta"]["objects"]:
            assert px[round(o["cx"]), round(o["cy"])] == COLOURS[o["colour"]], (o, m["meta"])
        assert [o["cell"] for o in m["meta"]["objects"]] == sorted(o["cell"] for o in m["meta"]["objects"])
        for k, task in enumerate(s["meta"]["tasks"]):
            a, b = s["conversation"][2 * k + 1]["content"], m["conversation"][2 * k + 1]["content"]
            if task == "position_lr":
                assert {a, b} == {"left", "right"}
                swapped += 1
            elif task in ("colour", "shape", "count_all", "count_shape", "count_colour", "size"):
                assert a == b
            q = m["conversation"][2 * k]["content"]
            assert not re.search("right (side )?or (the )?left", q), q
        back = mirror_sample(m)
        assert back["conversation"] == s["conversation"] and _hash(back["image"]) == _hash(s["image"])
    assert swapped >= 5
    for q in LR_QS:  # every phrasing the generator has keeps its options' order
        assert swap_sides(q.format(obj="red star")) == q.format(obj="red star"), q
    assert swap_sides("Is the red star in the top left side or the right side?") == \
        "Is the red star in the top left side or the right side?"
    assert swap_sides("What is directly to the left of the blue circle on the right?") == \
        "What is directly to the right of the blue circle on the left?"
    word = next(s for s in packed if s["meta"]["kind"] != "shapes")
    with pytest.raises(ValueError, match="only shape scenes"):
        mirror_sample(word)


def test_geometry_and_pixels(train_shapes):
    for s in train_shapes[:300]:
        px = s["image"].load()
        objs = s["meta"]["objects"]
        w, h = s["image"].size
        assert 1 <= len(objs) <= 6 and len({(o["colour"], o["shape"]) for o in objs}) == len(objs)
        for o in objs:
            assert 2 * o["r"] >= 1.5 * 16 * w / 224  # at least 1.5 patches of 16 px at 224
            assert o["col"] * w / 3 <= o["cx"] - o["r"] and o["cx"] + o["r"] <= (o["col"] + 1) * w / 3
            assert o["row"] * h / 3 <= o["cy"] - o["r"] and o["cy"] + o["r"] <= (o["row"] + 1) * h / 3
            assert px[round(o["cx"]), round(o["cy"])] == COLOURS[o["colour"]], (o, s["meta"])


def test_shifted_split():
    cfg = DataConfig()
    sizes, qtypes = set(), set()
    for i in range(40):
        s = make_sample("shifted", i, cfg)
        assert s["image"].size == (224, 224)
        sizes.add(tuple(s["meta"]["shift"]["canvas"]))
        qtypes.add(s["qtype"])
        arr = np.asarray(s["image"], dtype=np.int32)
        for o in s["meta"].get("objects", []):
            if o["r"] >= 12:
                got = arr[round(o["cy"]), round(o["cx"])]
                assert np.abs(got - COLOURS[o["colour"]]).max() < 60, (o, got)
    assert len(sizes) > 5 and {"ocr", "document"} & qtypes
    raw = make_sample("shifted", 0, DataConfig(shift=ShiftConfig(resize="none")))
    assert raw["image"].size == tuple(raw["meta"]["shift"]["canvas"])


def test_ocr_renders_in_bbox():
    cfg = DataConfig(mix={"ocr": 1.0})
    for i in range(50):
        s = make_sample("train", i, cfg)
        m = s["meta"]
        assert 3 <= len(s["answer"]) <= 6 and s["answer"] == m["text"] and m["font_size"] >= 0.12 * 224
        x0, y0, x1, y1 = m["bbox"]
        assert 0 <= x0 < x1 <= 224 and 0 <= y0 < y1 <= 224
        arr = np.asarray(s["image"], dtype=np.int32)
        ink = np.abs(arr - TEXT_BACKGROUNDS[m["background"]]).sum(-1) > 0
        assert ink[y0:y1, x0:x1].mean() > 0.1, m
        assert ink.sum() == ink[y0:y1, x0:x1].sum(), m  # nothing drawn outside the text box
        assert (np.abs(arr - COLOURS[m["text_colour"]]).sum(-1) < 30).sum() > 50


def test_pages_draw_their_runs_and_repeat_by_index():
    from llava_core.data.page import ALPHABET, MAX_CHARS, make_page, page_caption
    from llava_core.train.stage0_heads import text_runs

    for i in range(60):
        p = make_page(i)
        runs, arr = p["meta"]["runs"], np.asarray(p["image"], dtype=np.int32)
        assert np.array_equal(arr, np.asarray(make_page(i)["image"])) and runs == make_page(i)["meta"]["runs"]
        assert runs and sum(len(t) for t, *_ in runs) <= MAX_CHARS + 6
        assert all(3 <= len(t) <= 8 and set(t) <= set(ALPHABET) for t, *_ in runs)
        assert page_caption(p["meta"]) == "the text " + " , ".join(t for t, *_ in runs)
        ink = np.abs(arr - TEXT_BACKGROUNDS[p["meta"]["background"]]).sum(-1) > 0
        boxes = np.zeros_like(ink)
        for text, x, y, font in text_runs(p["meta"], 224):  # the boxes stage 0's targets are built from
            x0, y0, x1, y1 = font.getbbox(text)
            assert 0 <= x + x0 and x + x1 <= 224 and 0 <= y + y0 and y + y1 <= 224, (i, text)
            boxes[y + y0:y + y1, x + x0:x + x1] = True
        assert ink.sum() > 0 and ink.sum() == (ink & boxes).sum(), i  # every inked pixel lies in a run's box
    assert not np.array_equal(np.asarray(make_page(0)["image"]), np.asarray(make_page(1)["image"]))
    assert make_page(0, seed=1)["meta"]["runs"] != make_page(0)["meta"]["runs"]


def test_document_answers():
    cfg = DataConfig(mix={"document": 1.0})
    for i in range(60):
        s = make_sample("train", i, cfg)
        m, q, a = s["meta"], s["conversation"][0]["content"], s["answer"]
        assert m["total"] == sum(v for _, v in m["rows"])
        task = m["tasks"][0]
        if task == "doc_value":
            item = next(it for it, _ in m["rows"] if re.search(rf"\b{it}\b", q))
            assert a == str(dict(m["rows"])[item])
        else:
            assert a == {"doc_title": m["title"], "doc_total": str(m["total"]), "doc_rows": str(len(m["rows"]))}[task]


def test_mixes_and_pairs():
    cfg = DataConfig(mix="caption")
    assert {make_sample("train", i, cfg)["qtype"] for i in range(40)} <= {"caption_detailed", "caption_short"}
    pairs = list(caption_pairs("train", 5))
    assert len(pairs) == 5 and all(c.startswith("There ") and im.size == (224, 224) for im, c in pairs)
    small = make_sample("train", 0, DataConfig(image_size=112))
    assert small["image"].size == (112, 112)
    with pytest.raises(ValueError, match="qtypes"):
        DataConfig(mix={"colr": 1.0})
    with pytest.raises(ValueError, match="heldout"):
        make_sample("heldout", 0, DataConfig(mix={"ocr": 1.0}))
    with pytest.raises(ValueError, match="unknown split"):
        make_sample("dev", 0)
    with pytest.raises(IndexError):
        SyntheticDataset("train", 3)[3]


def test_save_grid_and_cli(train, tmp_path):
    path = tmp_path / "grid.png"
    save_grid(train[:10], path, cols=4)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == grid_size(10, cols=4)
    out = tmp_path / "cli.png"
    cli_main(["--split", "validation", "--n", "6", "--out", str(out)])
    with Image.open(out) as im:
        assert im.size == grid_size(6)
