"""Samples by (split, index), task mixes, and a map-style dataset over them.

A sample is {"image": PIL RGB, "conversation": [{"role", "content"}, ...], "qtype",
"answer" (the last assistant turn), "meta"}. The image goes with the first user turn;
no "<image>" token is written into the text, that is the chat template's job.
`meta` is the scene (kind, objects or text or document, geometry in output pixels)
plus "tasks", the fine-grained task of each turn (e.g. "position_lr", "doc_total").
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

from PIL import Image

from . import document, text
from .draw import render_shapes
from .kind import KINDS, ask_kind
from .questions import SHAPE_ASKERS, Ask
from .scene import SceneConfig, layout_key, make_objects, place, sample_layout
from .shift import ShiftConfig, corrupt, sample_shift
from .splits import bucket_of, owner_split, sample_rng
from .vocab import ALL_PAIRS, COLOURS, HELDOUT_PAIRS, SHAPES

QTYPES = tuple(SHAPE_ASKERS) + ("ocr", "document", "multiturn", "kind")
CAPTION_MIX = {"caption_detailed": 0.8, "caption_short": 0.2}  # stage 1: image -> caption
INSTRUCT_MIX = {  # stage 2: every task
    "colour": 1.0, "shape": 1.0, "count": 1.0, "size": 0.5, "position": 1.0, "relation": 1.0,
    "yesno": 1.5, "caption_short": 0.25, "caption_detailed": 0.25, "ocr": 1.0, "document": 1.0,
    "multiturn": 1.0,
}
# questions a user asks first that INSTRUCT_MIX (and so the scored suite) leaves out: "What shapes
# are in the image?", "Is there a star?", "What colour is the circle?" when there is none
NATURAL_MIX = {"list": 1.0, "presence": 1.0, "absent": 1.0}
CONTRASTIVE_MIX = {"caption_detailed": 1.0}  # (image, caption naming every object) pairs
MIXES = {"caption": CAPTION_MIX, "instruct": INSTRUCT_MIX, "natural": NATURAL_MIX, "contrastive": CONTRASTIVE_MIX}
# askers of text and document images by function name, the names packed weights use
TEXT_ASKERS = {a.__name__: a for a in (text.ask_ocr, text.ask_text_colour, text.ask_text_length)}
DOCUMENT_ASKERS = {a.__name__: a for a in document.DOC_ASKERS}
MULTITURN_SHAPE_ASKERS = ("colour", "shape", "count", "size", "position", "relation", "yesno")
_MAX_TRIES = 2000


@dataclass
class DataConfig:
    image_size: int = 224  # output images are image_size x image_size (shifted: unless shift.resize="none")
    seed: int = 0  # changes every stream; the split partition of layouts does not depend on it
    mix: dict | str = "instruct"  # qtype -> weight, or a name in MIXES
    split_fractions: tuple[float, float, float] = (0.9, 0.05, 0.05)  # train, validation, test
    heldout_pairs: tuple = HELDOUT_PAIRS
    font: str | None = None  # TTF path; None: first bold sans found (fonts.py)
    scene: SceneConfig = field(default_factory=SceneConfig)
    shift: ShiftConfig = field(default_factory=ShiftConfig)

    def __post_init__(self):
        if isinstance(self.mix, str):
            if self.mix not in MIXES:
                raise ValueError(f"DataConfig.mix={self.mix!r}: expected a dict or one of {tuple(MIXES)}")
            self.mix = dict(MIXES[self.mix])
        bad = [k for k in self.mix if k not in QTYPES]
        if bad or not any(w > 0 for w in self.mix.values()):
            raise ValueError(f"DataConfig.mix: unknown qtypes {bad} or no positive weight; qtypes are {QTYPES}")
        if abs(sum(self.split_fractions) - 1) > 1e-6:
            raise ValueError(f"DataConfig.split_fractions {self.split_fractions} do not sum to 1")
        bad = [p for p in self.heldout_pairs if p[0] not in COLOURS or p[1] not in SHAPES]
        if bad:
            raise ValueError(f"DataConfig.heldout_pairs: unknown colour or shape in {bad}")
        self.heldout_pairs = tuple(tuple(p) for p in self.heldout_pairs)
        self.train_pairs = tuple(p for p in ALL_PAIRS if p not in self.heldout_pairs)
        self.heldout_mix = {k: w for k, w in self.mix.items() if k in SHAPE_ASKERS or k == "multiturn"}


def _weighted(rng: random.Random, weights: dict) -> str:
    keys = [k for k, w in weights.items() if w > 0]
    return rng.choices(keys, [weights[k] for k in keys])[0]


def _in_split(key: str, split: str, cfg: DataConfig) -> bool:
    owner = owner_split(split)
    return owner is None or bucket_of(key, cfg.split_fractions) == owner


def _take(rng: random.Random, askers, k: int, *args) -> list:
    """Up to k turns from askers tried in random order, skipping those that return None."""
    askers = list(askers)
    rng.shuffle(askers)
    turns = []
    for ask in askers:
        out = ask(rng, *args)
        if out is not None:
            turns.append(out)
        if len(turns) == k:
            break
    return turns


def _draw(rng: random.Random, weights: dict, askers: dict, k: int, *args, key=lambda t: t[0]) -> list:
    """k turns drawn with replacement by `weights` (asker name -> weight), a turn whose `key`
    (default: the question) came before skipped; fewer when the scene runs out of new ones."""
    names = [n for n, w in weights.items() if w > 0 and n in askers]
    if not names:
        return []
    turns, seen = [], set()
    for _ in range(4 * k):
        out = askers[rng.choices(names, [weights[n] for n in names])[0]](rng, *args)
        if out is not None and key(out) not in seen:
            seen.add(key(out))
            turns.append(out)
        if len(turns) == k:
            break
    return turns


def _ask_kind_of_shapes(rng, objects, ctx):
    return ask_kind(rng, {"kind": "shapes"})


def _shape_turns(rng, qtype, split, cfg, turns_wanted: int = 0, weights: dict | None = None):
    heldout = split == "heldout"
    ctx = Ask(mention=ALL_PAIRS if heldout else cfg.train_pairs, focus=cfg.heldout_pairs if heldout else ())
    for _ in range(_MAX_TRIES):
        layout = sample_layout(rng, cfg.scene, ctx.mention, cfg.heldout_pairs if heldout else ())
        if not _in_split(layout_key(layout), split, cfg):
            continue
        objects = make_objects(layout)
        if turns_wanted:
            turns = _draw(rng, weights, {**SHAPE_ASKERS, "kind": _ask_kind_of_shapes}, turns_wanted, objects, ctx)
            ok = len(turns) > 0
        elif qtype == "multiturn":
            turns = _take(rng, [SHAPE_ASKERS[k] for k in MULTITURN_SHAPE_ASKERS], rng.choice((2, 3)), objects, ctx)
            ok = len(turns) >= 2
        elif qtype == "kind":
            turns, ok = [_ask_kind_of_shapes(rng, objects, ctx)], True
        else:
            turns = [SHAPE_ASKERS[qtype](rng, objects, ctx)]
            ok = turns[0] is not None
        if ok:
            return {"kind": "shapes", "objects": objects}, turns
    raise RuntimeError(f"no {split} scene for qtype {qtype!r} in {_MAX_TRIES} tries")


def _text_turns(rng, qtype, split, cfg, kind, turns_wanted: int = 0, weights: dict | None = None):
    sample, key = (text.sample_text, text.text_key) if kind == "text" else \
        (document.sample_document, document.document_key)
    for _ in range(_MAX_TRIES):
        meta = sample(rng)
        if _in_split(key(meta), split, cfg):
            break
    else:
        raise RuntimeError(f"no {split} {kind} scene in {_MAX_TRIES} tries")
    if turns_wanted:
        askers = {**(TEXT_ASKERS if kind == "text" else DOCUMENT_ASKERS), "ask_kind": ask_kind}
        w = {n: weights.get(n, 1.0) for n in askers}
        # one turn per (task, answer): asking for the same word in other words teaches nothing new
        return meta, _draw(rng, w, askers, turns_wanted, meta, key=lambda t: (t[2], t[1]))
    if qtype == "kind":
        return meta, [ask_kind(rng, meta)]
    if kind == "text":
        askers = tuple(TEXT_ASKERS.values())
        if qtype == "ocr":
            return meta, [text.ask_ocr(rng, meta)]
    else:
        askers = document.DOC_ASKERS
        if qtype == "document":
            return meta, [rng.choice(askers)(rng, meta)]
    return meta, _take(rng, askers, rng.choice((2, 3)), meta)


def _render(rng, meta, split, cfg) -> Image.Image:
    """Place and draw the scene: the fast path, or the shifted one (geometry mapped to output pixels)."""
    shifted = split == "shifted"
    params = sample_shift(rng, cfg.shift) if shifted else None
    w, h = params["canvas"] if shifted else (cfg.image_size, cfg.image_size)
    family, font = ("serif", None) if shifted else ("sans", cfg.font)
    paper = tuple(params["paper"]) if shifted else None
    if meta["kind"] == "shapes":
        place(rng, meta["objects"], w, h, cfg.scene, cfg.shift.max_rotation if shifted else 0.0)
        img = render_shapes(meta["objects"], w, h, paper or (255, 255, 255), cfg.shift.supersample if shifted else 1)
    elif meta["kind"] == "text":
        text.place_text(rng, meta, w, h, family, font)
        img = text.render_text(meta, w, h, family, font, paper)
    else:
        document.layout_document(rng, meta, w, h, family, font)
        img = document.render_document(meta, w, h, family, font, paper or (255, 255, 255))
    if not shifted:
        return img
    img, scale, (ox, oy) = corrupt(img, params, cfg.image_size, cfg.shift.resize)
    meta["shift"] = dict(params, scale=round(scale, 5), offset=[ox, oy])
    for o in meta.get("objects", ()):
        o.update(cx=round(o["cx"] * scale + ox, 1), cy=round(o["cy"] * scale + oy, 1), r=round(o["r"] * scale, 1))
    if "bbox" in meta:
        x0, y0, x1, y1 = meta["bbox"]
        meta["bbox"] = [round(x0 * scale + ox), round(y0 * scale + oy), round(x1 * scale + ox), round(y1 * scale + oy)]
    return img


def make_sample(split: str, index: int, config: DataConfig | None = None, turns: int = 1) -> dict:
    """Sample `index` of `split`; the same (config, split, index, turns) always gives the same sample.

    turns > 1 packs up to that many questions about one image into one sample (qtype "packed",
    "independent": True): the image is drawn as a shape scene, a word or a document by the
    mix's total weight for each kind, and every turn's question type by the mix's weights
    within the kind. The turns are meant to be answered independently, each seeing only the
    image (batches.encode_turns): a later question often names what an earlier one asked for
    ("Is the black diamond at the top?" after "What colour is the diamond?"). A draw of
    "multiturn" still gives a real conversation, whose turns do read each other."""
    cfg = config or DataConfig()
    rng = sample_rng(cfg.seed, split, index)
    mix = cfg.heldout_mix if split == "heldout" else cfg.mix
    if not mix:
        raise ValueError(f"the heldout split draws only shape scenes; mix {cfg.mix} has no shape qtype")
    if turns < 1:
        raise ValueError(f"make_sample: turns={turns}, expected >= 1")
    qtype = _weighted(rng, mix)
    independent = turns > 1 and qtype != "multiturn"
    if independent:
        meta, chosen = _packed_turns(rng, mix, split, cfg, turns)
        qtype = "packed"
    elif qtype == "kind":  # any scene: its kind first, a third each
        kind = rng.choice(KINDS)
        meta, chosen = (_shape_turns(rng, qtype, split, cfg) if kind == "shapes" else
                        _text_turns(rng, qtype, split, cfg, kind))
    elif qtype in SHAPE_ASKERS or (qtype == "multiturn" and (split == "heldout" or rng.random() < 0.6)):
        meta, chosen = _shape_turns(rng, qtype, split, cfg)
    else:
        kind = {"ocr": "text", "document": "document"}.get(qtype) or rng.choice(("text", "document"))
        meta, chosen = _text_turns(rng, qtype, split, cfg, kind)
    image = _render(rng, meta, split, cfg)
    conversation = []
    for q, a, _ in chosen:
        conversation += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    meta["tasks"] = [t for _, _, t in chosen]
    return {"image": image, "conversation": conversation, "qtype": qtype, "answer": chosen[-1][1], "meta": meta,
            "independent": independent}


def _packed_turns(rng, mix: dict, split: str, cfg: DataConfig, k: int):
    """(meta, turns) for make_sample(..., turns=k): up to k questions about one image."""
    shapes = {q: mix.get(q, 0.0) for q in (*SHAPE_ASKERS, "kind")}
    kinds = {"shapes": sum(w for q, w in shapes.items() if q != "kind"), "text": mix.get("ocr", 0.0),
             "document": mix.get("document", 0.0)}
    if split == "heldout":
        kinds.update(text=0.0, document=0.0)
    if not any(w > 0 for w in kinds.values()):  # a mix of "multiturn" alone never gets here
        raise ValueError(f"mix {mix} gives no shape, OCR or document question to pack")
    kind = _weighted(rng, kinds)
    if kind == "shapes":
        return _shape_turns(rng, "packed", split, cfg, k, shapes)
    # reading (the word, the title) weighs more: it is the skill the model lacks most
    return _text_turns(rng, "packed", split, cfg, kind, k,
                       {"ask_ocr": 2.0, "ask_title": 1.5, "ask_kind": mix.get("kind", 0.0)})


class SyntheticDataset:
    """Samples start..start+length-1 of a split. Map-style (len, getitem), so a torch
    DataLoader takes it as is; pass collate_fn=list since samples hold PIL images."""

    def __init__(self, split: str, length: int, config: DataConfig | None = None, start: int = 0):
        self.split, self.length, self.start = split, length, start
        self.config = config or DataConfig()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for {self.split} dataset of length {self.length}")
        return make_sample(self.split, self.start + i, self.config)

    def __iter__(self):
        return (self[i] for i in range(self.length))


def caption_pairs(split: str, n: int, config: DataConfig | None = None, start: int = 0):
    """(image, detailed caption naming every object) pairs for contrastive pretraining."""
    cfg = replace(config or DataConfig(), mix=dict(CONTRASTIVE_MIX))
    for i in range(start, start + n):
        s = make_sample(split, i, cfg)
        yield s["image"], s["answer"]
