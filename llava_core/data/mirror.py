"""Mirror a shape scene left to right, and say so in its text: a counterfactual twin.

The mirrored sample differs from its source only in which side things are on, so a model
trained on both sees exactly what "left" and "right" depend on: the column of the object,
which it must then read from the image tokens' content (the token order tells rows apart
readily and columns hardly at all; benchmarks/default_model.md). Every shape is symmetric about its
vertical axis, so a mirrored scene is still a scene the generator could draw.

Text: "left" and "right" swap everywhere (answers, cell names, relations) except in the
fixed options of a question ("on the left or the right?"), which keep their order, so a
twin's questions are the generator's own phrasings. Captions are rewritten from the mirrored
objects, which keeps them in canonical row-major order. Word and document images are not
mirrored (mirrored text is not text).
"""

from __future__ import annotations

import re

from PIL import ImageOps

from .questions import LR_QS, detailed_caption, short_caption
from .vocab import CELL_NAMES

# the either-or options of questions.LR_QS, from its first "left" to its last "right": their
# order is part of the phrasing, not of the answer ("left or the right", "left side or the right")
_OPTIONS = tuple(q[q.index("left"):q.rindex("right") + len("right")] for q in LR_QS)
_SIDE = re.compile(r"\b(left|right|Left|Right)\b")
_SWAP = {"left": "right", "right": "left", "Left": "Right", "Right": "Left"}
_CAPTIONS = {"caption_short": short_caption, "caption_detailed": detailed_caption}


def swap_sides(text: str) -> str:
    """'left' <-> 'right' (whole words), leaving the options of an either-or question as they are."""
    parts = re.split("(" + "|".join(map(re.escape, _OPTIONS)) + ")", text)
    return "".join(p if p in _OPTIONS else _SIDE.sub(lambda m: _SWAP[m.group(1)], p) for p in parts)


def mirror_objects(objects: list[dict], width: float) -> list[dict]:
    """The objects of a scene mirrored on a canvas `width` wide, in canonical (row-major) order."""
    out = []
    for o in objects:
        m = dict(o, col=2 - o["col"])
        m["cell"] = m["row"] * 3 + m["col"]
        m["position"] = CELL_NAMES[m["cell"]]
        if "cx" in m:
            m["cx"] = round(width - m["cx"], 1)
        if "rotation" in m:
            m["rotation"] = -m["rotation"]
        out.append(m)
    return sorted(out, key=lambda o: o["cell"])


def mirror_sample(sample: dict) -> dict:
    """make_sample's sample of a shape scene, mirrored left to right (image, text and meta)."""
    meta = sample["meta"]
    if meta.get("kind") != "shapes":
        raise ValueError(f"mirror_sample: only shape scenes can be mirrored, not a {meta.get('kind')!r} image")
    image = ImageOps.mirror(sample["image"])
    objects = mirror_objects(meta["objects"], image.width)
    tasks = meta["tasks"]  # one per (user, assistant) turn
    conversation = []
    for i, m in enumerate(sample["conversation"]):
        if m["role"] == "assistant" and tasks[i // 2] in _CAPTIONS:
            content = _CAPTIONS[tasks[i // 2]](objects)
        else:
            content = swap_sides(m["content"])
        conversation.append({"role": m["role"], "content": content})
    return dict(sample, image=image, conversation=conversation, answer=conversation[-1]["content"],
                meta=dict(meta, objects=objects, mirrored=True))
