"""An original LLaVA checkpoint (haotian-liu/LLaVA, e.g. liuhaotian/llava-v1.5-7b) plus the CLIP
vision folder it names -> a llava-hf checkpoint folder that transformers and `load_pretrained` read.

The original repository saves its decoder as a plain LLaMA checkpoint with the projector beside
it and the tower only named (`mm_vision_tower`):
    model.embed_tokens.weight, model.layers.N.*, model.norm.weight, lm_head.weight
    model.mm_projector.{0,2}.{weight,bias}   nn.Sequential(Linear, GELU, Linear) for mlp2x_gelu
    model.mm_projector.{weight,bias}         one nn.Linear for `linear`
    model.layers.N.self_attn.rotary_emb.inv_freq   a buffer, recomputed from the config
and a flat config.json (LLaMA fields + `mm_*`). The CLIP folder is transformers' CLIPModel or
CLIPVisionModel layout (`vision_model.*`), as `openai/clip-vit-large-patch14-336` is saved.

The conversion is what llava-hf did for its hub folders (transformers'
`convert_llava_weights_to_hf.py`), in the transformers-4.x hub layout:
  - names: one prefix table per source (`key_table`, `CLIP_TABLE`); its inverse, used to name
    the source key of a missing tensor, is the same table read right to left;
  - vocabulary: `<image>` and `<pad>` appended to the tokenizer (ids V and V+1 for a V-token
    tokenizer), the embedding and lm_head padded with new rows to a multiple of 64 (32000 ->
    32064). Existing rows are copied unchanged, so every existing token keeps its id and its
    logits. The new rows are the mean of the existing rows (llava-hf sampled them from a normal
    with that mean and the rows' covariance): deterministic, and an lm_head row at the mean
    scores the mean logit, so `<image>`/`<pad>` are never likelier than an average token;
  - config.json in llava-hf's nested form, `preprocessor_config.json` as a LlavaImageProcessor
    with `do_pad` when the original pads images to a square (`image_aspect_ratio: pad`), the
    vicuna_v1 chat template the original model was trained with.

Names and shapes are all checked before a byte is written, and the folder is written beside
the destination and renamed into place (`atomic_folder`): a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from ..model.config import (ORIGINAL_FIELDS, ConfigError, LlavaConfig, ProjectorConfig, TextConfig, VisionConfig,
                            parse_projector)
from ..model.llava import LlavaModel
from .export import atomic_folder, generation_config, hub_names, llava_hf_config, write_json

log = logging.getLogger(__name__)

__all__ = ["ConversionError", "convert_original", "convert_config", "key_table", "CLIP_TABLE",
           "VICUNA_V1_CHAT_TEMPLATE"]


class ConversionError(ValueError):
    """An original checkpoint or CLIP folder that cannot be converted; the message names the file,
    key or field at fault."""


# --- key tables ---------------------------------------------------------------------------------

def key_table(projector: str) -> list[tuple[str, str]]:
    """(original prefix, llava-hf prefix) for the decoder and a `projector` of that kind; the first
    matching prefix renames a key."""
    family, depth = parse_projector(projector)
    if family == "linear":  # one nn.Linear, unindexed
        mm = [("model.mm_projector.", "multi_modal_projector.linear_1.")]
    else:  # nn.Sequential(Linear, GELU, Linear, ...): linear i sits at index 2(i-1)
        mm = [(f"model.mm_projector.{2 * i}.", f"multi_modal_projector.linear_{i + 1}.") for i in range(depth)]
    return mm + [
        ("model.embed_tokens.", "language_model.model.embed_tokens."),
        ("model.layers.", "language_model.model.layers."),
        ("model.norm.", "language_model.model.norm."),
        ("lm_head.", "language_model.lm_head."),
    ]


# CLIPModel / CLIPVisionModel as transformers 4.x saved them (the hub's openai folders) say
# `vision_model.*`; transformers 5 saves a CLIPVisionModel without that prefix.
CLIP_TABLE: list[tuple[str, str]] = [("vision_model.", "vision_tower.vision_model.")] + [
    (p, "vision_tower.vision_model." + p) for p in ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")]

# Keys with nothing to carry over: buffers recomputed from the config, and the parts of a full
# CLIPModel that LLaVA does not use (the text tower, both projections, the logit scale).
DROPPED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$"
                     r"|^(vision_model\.)?embeddings\.position_ids$"
                     r"|^(text_model\.|text_projection\.|visual_projection\.|logit_scale$)")

VOCAB_KEYS = ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight")


def rename(key: str, table: list[tuple[str, str]]) -> str | None:
    for old, new in table:
        if key.startswith(old):
            return new + key[len(old):]
    return None


def origin(hub_key: str, table: list[tuple[str, str]]) -> str | None:
    """The source key that `rename` maps to hub_key (the table read right to left)."""
    return rename(hub_key, [(new, old) for old, new in table])


# --- config ----------------------------------------------------------------------------------------

# LLaMA fields of the original flat config that carry over to text_config (the rest are mm_*,
# training switches and generation defaults).
TEXT_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
               "rope_scaling", "tie_word_embeddings", "bos_token_id", "eos_token_id")
VISION_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                 "patch_size", "num_channels", "hidden_act", "layer_norm_eps")
SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}  # mm_vision_select_feature -> strategy


def _require(ok: bool, source: str, field: str, value, allowed: str) -> None:
    if not ok:
        raise ConversionError(f"{source}: {field}={value!r} cannot be converted ({allowed})")


def clip_vision_dict(d: dict, source: str) -> dict:
    """The vision part of a CLIP folder's config.json (a CLIPConfig or a CLIPVisionConfig)."""
    kind = d.get("model_type")
    if kind == "clip":
        return dict(d.get("vision_config") or {})
    if kind == "clip_vision_model":
        return d
    raise ConversionError(f"{source}: model_type={kind!r}, not a CLIP vision folder (expected 'clip' or "
                          "'clip_vision_model', as openai/clip-vit-large-patch14-336 is saved)")


def convert_config(original: dict, clip_vision: dict, n_tokens: int, source: str = "config.json"
                   ) -> tuple[LlavaConfig, bool]:
    """(our LlavaConfig for the converted model, whether images are padded to a square), from the
    original config, the CLIP vision config and the size of the original tokenizer."""
    if "vision_config" in original or "text_config" in original or not any(k in original for k in ORIGINAL_FIELDS):
        raise ConversionError(f"{source}: not an original LLaVA config (it needs top-level "
                              f"{', '.join(ORIGINAL_FIELDS)} and no vision_config/text_config); a llava-hf "
                              "folder needs no conversion")
    get = original.get
    _require(get("model_type") in ("llava", "llava_llama", None), source, "model_type", get("model_type"),
             "a LLaMA base: llava or llava_llama; Mistral and MPT bases are not supported")
    for field, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False),
                      ("pretraining_tp", 1), ("mm_use_im_start_end", False), ("mm_use_im_patch_token", False),
                      ("mm_resampler_type", None)):
        _require(get(field, ok) == ok, source, field, get(field), f"only {ok!r}")
    _require(get("mm_patch_merge_type", "flat") == "flat", source, "mm_patch_merge_type",
             get("mm_patch_merge_type"), "flat; 'spatial*' is LLaVA-NeXT")
    aspect = get("image_aspect_ratio", "square")
    _require(aspect in ("square", "pad"), source, "image_aspect_ratio", aspect,
             "square or pad; 'anyres' is LLaVA-NeXT")
    feature = get("mm_vision_select_feature", "patch")
    _require(feature in SELECT_FEATURE, source, "mm_vision_select_feature", feature, "patch or cls_patch")
    kind = get("mm_projector_type", "linear")  # the original builder's default
    family = None
    try:
        family, _ = parse_projector(kind)
    except ConfigError:
        pass
    _require(family in ("linear", "mlpNx_gelu"), source, "mm_projector_type", kind, "linear or mlp2x_gelu")
    layer = get("mm_vision_select_layer", -2)
    _require(isinstance(layer, int), source, "mm_vision_select_layer", layer, "one layer index")

    vocab = get("vocab_size", 32000)
    if n_tokens > vocab:
        raise ConversionError(f"{source}: the tokenizer has {n_tokens} tokens but vocab_size is {vocab}")
    image_id, pad_id = n_tokens, n_tokens + 1  # appended after the tokenizer's own tokens
    new_vocab = -(-max(vocab, n_tokens + 2) // 64) * 64  # padded to a multiple of 64, as llava-hf did
    try:
        vision = VisionConfig(**{k: clip_vision[k] for k in VISION_FIELDS if k in clip_vision})
        text = TextConfig(vocab_size=new_vocab, pad_token_id=pad_id,
                          **{k: original[k] for k in TEXT_FIELDS if original.get(k) is not None})
        cfg = LlavaConfig(vision=vision, text=text, projector=ProjectorConfig(kind=kind, bias=True),
                          image_token_index=image_id, vision_feature_layer=layer,
                          vision_feature_select_strategy=SELECT_FEATURE[feature])
    except ConfigError as e:
        raise ConversionError(f"{source} (with the CLIP vision config): {e}") from None
    mm_hidden = get("mm_hidden_size", vision.hidden_size)
    if mm_hidden != vision.hidden_size:
        raise ConversionError(f"{source}: mm_hidden_size={mm_hidden} but the CLIP vision tower's hidden_size "
                              f"is {vision.hidden_size}: not the tower this checkpoint was trained with")
    return cfg, aspect == "pad"


# --- weight files ----------------------------------------------------------------------------------

def weight_files(folder: Path, trust_pickle: bool) -> list[Path]:
    """The weight files of a folder: an index's shards, or one file; safetensors first."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConversionError(f"{index}: not a weight index ({e!r})") from None
            files = [folder / name for name in sorted(set(weight_map.values()))]
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise ConversionError(f"{index} names shard(s) that do not exist: {', '.join(absent)}")
            break
        if (folder / single).is_file():
            files = [folder / single]
            break
    else:
        raise ConversionError(f"{folder}: no model.safetensors[.index.json] or pytorch_model.bin[.index.json]")
    pickles = [f for f in files if f.suffix == ".bin"]
    if pickles and not trust_pickle:
        raise ConversionError(f"{pickles[0]}: a pickle file; unpickling can run arbitrary code. Pass "
                              "--trust-pickle (trust_pickle=True) if you trust where it came from")
    return files


class _Tensors:
    """The tensors of one weight file: names and shapes without reading data, tensors on demand."""

    def __init__(self, path: Path):
        self.path = path
        if path.suffix == ".bin":
            try:  # weights_only: tensors and plain containers only; mmap: no data read yet
                self._sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:  # torch raises several kinds for a bad pickle
                raise ConversionError(f"{path}: not a readable torch checkpoint ({e})") from None
            self.shapes = {k: tuple(t.shape) for k, t in self._sd.items()}
        else:
            from safetensors import SafetensorError, safe_open
            try:
                self._handle = safe_open(str(path), framework="pt")
                self.shapes = {k: tuple(self._handle.get_slice(k).get_shape()) for k in self._handle.keys()}
            except (SafetensorError, OSError) as e:
                raise ConversionError(f"{path}: not a readable safetensors file ({e})") from None

    def get(self, key: str) -> torch.Tensor:
        return self._sd[key] if self.path.suffix == ".bin" else self._handle.get_tensor(key)


# --- the conversion ------------------------------------------------------------------------------

# vicuna_v1 (llava/conversation.py: conv_vicuna_v1), the format LLaVA-1.5 was trained on, as a chat
# template: "{system} USER: <image>\n{question} ASSISTANT: {answer}</s>USER: ..."; it renders what
# processor.py's built-in "vicuna_v1" renders.
_VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the human's questions.")
VICUNA_V1_CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='" + _VICUNA_SYSTEM.replace("'", "\\'") + "') -%}"
    "{%- for m in messages if m['role'] == 'system' -%}"
    "{%- if m['content'] is string -%}{%- set ns.system = m['content'] -%}"
    "{%- else -%}{%- set ns.system = m['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join(' ') -%}{%- endif -%}"
    "{%- endfor -%}"
    "{{- ns.system + ' ' -}}"
    "{%- for m in messages if m['role'] != 'system' -%}"
    "{{- m['role'].upper() + ': ' -}}"
    "{%- if m['content'] is string -%}{{- m['content'] -}}{%- else -%}"
    "{%- for item in m['content'] if item['type'] == 'image' -%}{{- '<image>\\n' -}}{%- endfor -%}"
    "{{- m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -}}"
    "{%- endif -%}"
    "{{- ' ' if m['role'] == 'user' else '</s>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ConversionError(f"{path}: missing ({what})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None


def convert_original(src: str | Path, dst: str | Path, vision_tower: str | Path, *,
                     dtype: torch.dtype = torch.float16, overwrite: bool = False,
                     trust_pickle: bool = False) -> Path:
    """Convert the original LLaVA checkpoint folder `src`, with the CLIP vision folder `vision_tower`,
    into a llava-hf folder at `dst`. An existing non-empty `dst` is replaced only with overwrite=True
    (and only if it is a checkpoint folder)."""
    from transformers import AutoTokenizer

    src, dst, clip_dir = Path(src), Path(dst), Path(vision_tower)
    for folder, what in ((src, "original LLaVA checkpoint"), (clip_dir, "CLIP vision folder")):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such folder ({what})")
        if dst.resolve() == folder.resolve() or folder.resolve().is_relative_to(dst.resolve()):
            raise ConversionError(f"{dst}: the destination would replace the {what} it is read from")
    if dst.exists() and not (dst.is_dir() and not any(dst.iterdir())) and not overwrite:
        raise FileExistsError(f"{dst}: exists and is not empty; pass --force (overwrite=True) to replace it")

    original = _read_json(src / "config.json", "the original LLaVA config")
    clip_vision = clip_vision_dict(_read_json(clip_dir / "config.json", "the CLIP config"),
                                   str(clip_dir / "config.json"))
    preprocessor = _read_json(clip_dir / "preprocessor_config.json", "the CLIP image preprocessing")
    tokenizer = AutoTokenizer.from_pretrained(str(src))
    if "<image>" in tokenizer.get_vocab():
        raise ConversionError(f"{src}: the tokenizer already has an <image> token (id "
                              f"{tokenizer.convert_tokens_to_ids('<image>')}); an original LLaVA tokenizer has none")
    n_tokens = len(tokenizer)
    cfg, pad = convert_config(original, clip_vision, n_tokens, str(src / "config.json"))

    plan = _plan(cfg, original.get("vocab_size", 32000), key_table(cfg.projector.kind),
                 weight_files(src, trust_pickle), weight_files(clip_dir, trust_pickle))

    with atomic_folder(dst, overwrite=overwrite) as tmp:
        _write_processor_files(tmp, cfg, _preprocessor(preprocessor, pad, clip_dir / "preprocessor_config.json"))
        tokenizer.add_tokens(["<image>"], special_tokens=True)
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
        got = (tokenizer.convert_tokens_to_ids("<image>"), tokenizer.pad_token_id)
        if got != (cfg.image_token_index, cfg.text.pad_token_id):
            raise ConversionError(f"{src}: <image>, <pad> became ids {got}, expected "
                                  f"{(cfg.image_token_index, cfg.text.pad_token_id)}")
        tokenizer.padding_side = "left"  # as llava-hf ships it; batched generation pads on the left
        tokenizer.chat_template = VICUNA_V1_CHAT_TEMPLATE
        tokenizer.save_pretrained(str(tmp))

        weight_map, total = {}, 0
        for i, (source, entries) in enumerate(plan, 1):  # one output shard per source file
            name = f"model-{i:05d}-of-{len(plan):05d}.safetensors"
            shard = {hub: _converted(source.get(key), hub, cfg.text.vocab_size, dtype) for key, hub in entries}
            _save_shard(shard, tmp / name)
            weight_map.update({hub: name for hub in shard})
            total += sum(t.numel() * t.element_size() for t in shard.values())
            del shard
        write_json(tmp / "model.safetensors.index.json", {"metadata": {"total_size": total},
                                                           "weight_map": dict(sorted(weight_map.items()))})
        write_json(tmp / "config.json", llava_hf_config(cfg, dtype))
        write_json(tmp / "generation_config.json", generation_config(cfg))
    log.info("converted %s + %s -> %s (%d tensors, vocab %d)", src, clip_dir, dst, len(weight_map),
             cfg.text.vocab_size)
    return dst


def _plan(cfg: LlavaConfig, src_vocab: int, table: list[tuple[str, str]], llava_files: list[Path],
          clip_files: list[Path]) -> list[tuple[_Tensors, list[tuple[str, str]]]]:
    """[(source file, [(source key, hub key)])], after checking every name and shape against the
    model the config describes; all problems in one ConversionError."""
    with torch.device("meta"):
        model = LlavaModel(cfg)
    expected = {}  # hub key -> shape, as the loader will want it
    for name, t in model.state_dict().items():
        for hub, part in hub_names(name):
            expected[hub] = (t.shape[0] // 3,) + tuple(t.shape[1:]) if part else tuple(t.shape)
    if cfg.text.tie_word_embeddings:
        expected.pop("language_model.lm_head.weight")
    hidden = cfg.text.hidden_size

    plan, seen = [], {}
    unexpected, mismatched = [], []
    for files, tbl in ((llava_files, table), (clip_files, CLIP_TABLE)):
        for f in files:
            source, entries = _Tensors(f), []
            for key, shape in source.shapes.items():
                if DROPPED.search(key):
                    continue
                hub = rename(key, tbl)
                where = f"{key} (in {f})"
                if hub not in expected:
                    why = (": the checkpoint carries its own vision tower, which is not supported; the tower "
                           "comes from --vision-tower" if key.startswith("model.vision_tower.") else "")
                    unexpected.append(where + why)
                    continue
                if hub in seen:
                    unexpected.append(f"{where}: a second source for {hub}, after {seen[hub]}")
                    continue
                seen[hub] = where
                want = (src_vocab, hidden) if hub in VOCAB_KEYS else expected[hub]
                if shape != want:
                    mismatched.append(f"{where}: shape {list(shape)}, expected {list(want)} for {hub}")
                entries.append((key, hub))
            plan.append((source, entries))
    missing = [f"{origin(hub, table) or origin(hub, CLIP_TABLE)} (-> {hub})" for hub in expected if hub not in seen]
    if missing or unexpected or mismatched:
        lines = [f"cannot convert {llava_files[0].parent} with the CLIP folder {clip_files[0].parent} "
                 f"(projector {cfg.projector.kind!r}):"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", mismatched)):
            if items:
                lines += [f"  {len(items)} {title}:"] + [f"    {x}" for x in items[:20]]
                lines += [f"    ... and {len(items) - 20} more"] if len(items) > 20 else []
        raise ConversionError("\n".join(lines))
    return plan


def _converted(t: torch.Tensor, hub: str, vocab: int, dtype: torch.dtype) -> torch.Tensor:
    """A source tensor as the llava-hf folder stores it: cast, and vocabulary rows padded with
    their mean (see the module docstring)."""
    if hub in VOCAB_KEYS and t.shape[0] < vocab:
        rows = t.float()  # (V, C)
        extra = rows.mean(0, keepdim=True).expand(vocab - rows.shape[0], -1)  # (V' - V, C)
        return torch.cat([rows, extra]).to(dtype)  # (V', C)
    return t.to(dtype, copy=True)  # its own storage: safetensors refuses tensors that share one


def _save_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file
    save_file(tensors, str(path), metadata={"format": "pt"})


# CLIPImageProcessor fields that carry over; sizes written in the dict form transformers 5 reads
_IMAGE_FIELDS = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
                 "do_normalize", "image_mean", "image_std", "do_convert_rgb")


def _preprocessor(d: dict, pad: bool, source: Path) -> dict:
    """The CLIP folder's preprocessor_config.json as llava-hf writes it; with pad, a LlavaImageProcessor
    with do_pad (LLaVA-1.5's expand2square, then CLIP's resize and crop)."""
    kind = d.get("image_processor_type", d.get("feature_extractor_type"))
    if kind not in (None, "CLIPImageProcessor", "CLIPImageProcessorFast", "CLIPFeatureExtractor"):
        raise ConversionError(f"{source}: image_processor_type={kind!r}, not CLIP's image processor")
    out = {k: d[k] for k in _IMAGE_FIELDS if k in d}
    if isinstance(out.get("size"), int):
        out["size"] = {"shortest_edge": out["size"]}
    if isinstance(out.get("crop_size"), int):
        out["crop_size"] = {"height": out["crop_size"], "width": out["crop_size"]}
    out.update(image_processor_type="LlavaImageProcessor" if pad else "CLIPImageProcessor",
               processor_class="LlavaProcessor")
    if pad:
        out["do_pad"] = True
    return out


def _write_processor_files(folder: Path, cfg: LlavaConfig, preprocessor: dict) -> None:
    """preprocessor_config.json (checked against the tower's image size), processor_config.json and
    chat_template.json, as llava-hf ships them."""
    from ..model.processor import ImageConfig

    write_json(folder / "preprocessor_config.json", preprocessor)
    try:
        ImageConfig.from_json(folder / "preprocessor_config.json", cfg.vision.image_size)
    except ConfigError as e:
        raise ConversionError(f"the CLIP folder's preprocessor_config.json does not fit its tower: {e}") from None
    write_json(folder / "processor_config.json", {
        "processor_class": "LlavaProcessor", "image_token": "<image>", "patch_size": cfg.vision.patch_size,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy, "num_additional_image_tokens": 1})
    write_json(folder / "chat_template.json", {"chat_template": VICUNA_V1_CHAT_TEMPLATE})
