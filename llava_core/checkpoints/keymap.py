"""The one table between llava-hf checkpoint names and llava_core parameter names.

The loader reads it from checkpoint to model (`map_key`), export from model to checkpoint
(`hub_names`); neither direction is written twice. Three llava-hf layouts reach the loader:
  (a) hub files written by transformers 4.x: `language_model.model.*`, `language_model.lm_head.*`,
      `vision_tower.vision_model.*` (HF CLIP spelling, `pre_layrnorm`), `multi_modal_projector.*`;
  (b) transformers 5 `save_pretrained`: as (a) but `vision_tower.*` without `vision_model`;
  (c) transformers 5 in-memory names: `model.language_model.*`, `model.vision_tower.*`,
      `model.multi_modal_projector.*`, `lm_head.*`.
LAYOUTS first rewrites (b) and (c) into (a), the layout KEY_MAP is written in and export writes.

HF CLIP stores an attention's q, k and v apart; open_clip packs them into one `in_proj`. KEY_MAP
names such a parameter `...in_proj_weight[q]` (or `[k]`, `[v]`): the loader reads the checkpoint
tensor into those rows of the packed tensor (`qkv_rows`), export splits the rows back out.
"""

from __future__ import annotations

import re

import torch

# Any llava-hf layout -> layout (a); every rule that matches applies, in order.
LAYOUTS: list[tuple[str, str]] = [
    (r"^model\.language_model\.", "language_model.model."),  # (c)
    (r"^lm_head\.", "language_model.lm_head."),  # (c)
    (r"^model\.vision_tower\.", "vision_tower."),  # (c)
    (r"^vision_tower\.(?!vision_model\.)", "vision_tower.vision_model."),  # (b), (c)
    (r"^model\.multi_modal_projector\.", "multi_modal_projector."),  # (c)
    (r"^model\.image_newline$", "image_newline"),  # (c), LLaVA-NeXT
]

# Checkpoint keys that hold no weight (layout (a) names): dropped on load.
DROPPED: list[str] = [
    r"\.rotary_emb\.inv_freq$",  # a buffer some old files carry; recomputed from the config
    r"^vision_tower\.vision_model\.embeddings\.position_ids$",  # an index buffer
]

# (llava-hf name in layout (a), llava_core parameter name): the first row whose template matches
# the whole name applies, in either direction. In a template {i} is a layer number, {w} weight
# or bias, {rest} any remaining dotted name, {qkv} one of q, k, v.
_CLIP, _OC = "vision_tower.vision_model.", "vision_tower.visual."  # HF CLIPVisionTransformer, open_clip
_LAYER, _BLOCK = _CLIP + "encoder.layers.{i}.", _OC + "transformer.resblocks.{i}."
KEY_MAP: list[tuple[str, str]] = [
    ("language_model.lm_head.{rest}", "language_model.lm_head.{rest}"),
    ("language_model.model.{rest}", "language_model.{rest}"),
    ("multi_modal_projector.{rest}", "projector.{rest}"),
    ("image_newline", "image_newline"),  # LLaVA-NeXT: the learned token after each row of image features
    (_CLIP + "embeddings.patch_embedding.{w}", _OC + "conv1.{w}"),
    (_CLIP + "embeddings.class_embedding", _OC + "class_embedding"),
    (_CLIP + "embeddings.position_embedding.weight", _OC + "positional_embedding"),
    (_CLIP + "pre_layrnorm.{w}", _OC + "ln_pre.{w}"),
    (_CLIP + "post_layernorm.{w}", _OC + "ln_post.{w}"),
    (_LAYER + "layer_norm1.{w}", _BLOCK + "ln_1.{w}"),
    (_LAYER + "layer_norm2.{w}", _BLOCK + "ln_2.{w}"),
    (_LAYER + "mlp.fc1.{w}", _BLOCK + "mlp.c_fc.{w}"),
    (_LAYER + "mlp.fc2.{w}", _BLOCK + "mlp.c_proj.{w}"),
    (_LAYER + "self_attn.out_proj.{w}", _BLOCK + "attn.out_proj.{w}"),
    (_LAYER + "self_attn.{qkv}_proj.{w}", _BLOCK + "attn.in_proj_{w}[{qkv}]"),  # qkv_rows
]

_FIELDS = {"i": r"\d+", "w": r"weight|bias", "rest": r".+", "qkv": r"[qkv]"}


def _regex(template: str) -> re.Pattern:
    """'a.{i}.b' -> a full-match pattern with one named group per field."""
    pieces = re.split(r"\{(\w+)\}", template)  # literal, field, literal, ...
    return re.compile("".join(re.escape(p) if k % 2 == 0 else f"(?P<{p}>{_FIELDS[p]})"
                              for k, p in enumerate(pieces)))


_LAYOUTS = [(re.compile(p), r) for p, r in LAYOUTS]
_DROPPED = [re.compile(p) for p in DROPPED]
_FROM_HUB = [(_regex(hub), ours) for hub, ours in KEY_MAP]
_TO_HUB = [(_regex(ours.replace("[{qkv}]", "")), hub, "[{qkv}]" in ours) for hub, ours in KEY_MAP]


def map_key(key: str) -> str | None:
    """A checkpoint key (any layout) -> the model's parameter name (None: dropped). A key no row
    places comes back in layout (a), for the loader to report as unexpected."""
    for pattern, repl in _LAYOUTS:
        key = pattern.sub(repl, key)
    if any(p.search(key) for p in _DROPPED):
        return None
    for pattern, ours in _FROM_HUB:
        if m := pattern.fullmatch(key):
            return ours.format(**m.groupdict())
    return key


def hub_names(name: str) -> list[tuple[str, str | None]]:
    """Our parameter name -> [(hub key, None)], or three (hub key, 'q'|'k'|'v') for a packed in_proj."""
    for pattern, hub, packed in _TO_HUB:
        if m := pattern.fullmatch(name):
            if packed:
                return [(hub.format(qkv=part, **m.groupdict()), part) for part in "qkv"]
            return [(hub.format(**m.groupdict()), None)]
    raise KeyError(f"parameter {name!r} has no llava-hf name (no row of keymap.KEY_MAP matches it)")


def qkv_rows(packed: torch.Tensor, part: str) -> torch.Tensor:
    """The rows of open_clip's packed in_proj (3D, ...) = cat(q, k, v) on dim 0 that hold HF CLIP's
    q, k or v: a view to read that tensor into (or to write it out from)."""
    d = packed.shape[0] // 3
    i = "qkv".index(part)
    return packed[i * d:(i + 1) * d]  # (D, D) or (D,)
