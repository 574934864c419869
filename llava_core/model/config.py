"""Configuration dataclasses for LLaVA, read from a llava-hf `config.json`.

A llava-hf config nests a CLIP vision config and a LLaMA text config. Hub files
written by transformers 4.x omit every field equal to its class default (the
7B config names only `max_position_embeddings`, `rms_norm_eps` and `vocab_size`
for the text model), so the defaults below are transformers' own: a field the
file leaves out means what transformers would read it as.

A field we cannot honour is a `ConfigError` naming it, never a silent default.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar


class ConfigError(ValueError):
    """A config.json field that llava_core cannot honour."""


@dataclass
class VisionConfig:
    # CLIPVisionConfig defaults (transformers), so a sparse hub file reads the same.
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"vision_config: hidden_size {self.hidden_size} is not divisible by "
                              f"num_attention_heads {self.num_attention_heads}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision_config: image_size {self.image_size} is not a multiple of "
                              f"patch_size {self.patch_size}")
        if self.hidden_act not in ("quick_gelu", "gelu"):
            raise ConfigError(f"vision_config.hidden_act={self.hidden_act!r} is not supported "
                              "(quick_gelu or gelu)")
        if self.num_channels != 3:
            raise ConfigError(f"vision_config.num_channels={self.num_channels} is not supported (3)")
        self.grid = self.image_size // self.patch_size  # patches per side
        self.num_patches = self.grid * self.grid


@dataclass
class TextConfig:
    # LlamaConfig defaults (transformers), so a sparse hub file reads the same.
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: same as num_attention_heads (no GQA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear"|"llama3", "factor": ..., ...}
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    sliding_window: int | None = None  # Mistral: a query at position p reads keys in (p - window, p]

    def __post_init__(self):
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise ConfigError(f"text_config.sliding_window={self.sliding_window!r}: expected a positive "
                              "integer or null")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"text_config: num_attention_heads {self.num_attention_heads} is not a "
                              f"multiple of num_key_value_heads {self.num_key_value_heads}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("linear", "llama3", "default"):
                raise ConfigError(f"text_config.rope_scaling type {kind!r} is not supported "
                                  "(linear, llama3)")
            if kind == "default":
                self.rope_scaling = None

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]


# --- projector names ------------------------------------------------------------------
# projector.py builds the modules; their names and token counts live here, free of torch, so
# that LlavaConfig can count image tokens. Family (as users see it) -> the full-match pattern;
# `n` is the number in the name. The table of what each one is sits in projector.py's docstring.
PROJECTORS: dict[str, str] = {
    "linear": r"linear",
    "mlpNx_gelu": r"mlp(?P<n>[1-9]\d*)x_gelu",  # N linear layers, GELU between
    "mlpNx_gelu_pos": r"mlp(?P<n>[1-9]\d*)x_gelu_pos",  # the same, plus a learned row and column embedding
    "mlpNx_gelu_cols": r"mlp(?P<n>[1-9]\d*)x_gelu_cols",  # the same tokens twice: row-major, then column-major
    "mlpNx_gelu_newline": r"mlp(?P<n>[1-9]\d*)x_gelu_newline",  # the same, a learned token after each row
    "identity": r"identity",  # vision width must equal text width
    "avgpoolK_mlp2x_gelu": r"avgpool(?P<n>[1-9]\d*)_mlp2x_gelu",  # K x K average pooling, then mlp2x_gelu
    # K x K neighbouring patches concatenated (space-to-depth), then mlp2x_gelu from K²·Dv
    "shuffleK_mlp2x_gelu": r"shuffle(?P<n>[1-9]\d*)_mlp2x_gelu",
    "cabstractor[M]": r"cabstractor(?P<n>[1-9]\d*)?",  # M output tokens (a square); none: a quarter
    "ldp": r"ldp",  # a quarter of the patches
    "resamplerQ": r"resampler(?P<n>[1-9]\d*)",  # Q learned queries -> Q tokens
}
# a square grid, no CLS
GRID_PROJECTORS = ("avgpoolK_mlp2x_gelu", "shuffleK_mlp2x_gelu", "cabstractor[M]", "ldp", "mlpNx_gelu_pos",
                   "mlpNx_gelu_cols", "mlpNx_gelu_newline")


def parse_projector(kind: str) -> tuple[str, int | None]:
    """'avgpool2_mlp2x_gelu' -> ('avgpoolK_mlp2x_gelu', 2); an unknown name is a ConfigError."""
    for family, pattern in PROJECTORS.items():
        m = re.fullmatch(pattern, kind) if isinstance(kind, str) else None
        if m:
            n = m.groupdict().get("n")
            return family, None if n is None else int(n)
    raise ConfigError(f"projector {kind!r} is unknown; known: {', '.join(PROJECTORS)} (N, K, M, Q: "
                      "positive numbers, e.g. mlp2x_gelu, avgpool2_mlp2x_gelu, cabstractor144, resampler64)")


def grid_side(n_tokens: int, kind: str) -> int:
    """Patches per side of the square grid that n_tokens vision tokens form, for projector `kind`."""
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise ConfigError(f"projector {kind!r} works on a square patch grid, but N={n_tokens} vision "
                          "tokens per image is not a square")
    return side


def projector_tokens(kind: str, n_tokens: int) -> int:
    """Tokens per image that projector `kind` emits for n_tokens vision tokens (patches, + CLS)."""
    family, n = parse_projector(kind)
    if family in ("linear", "mlpNx_gelu", "identity"):
        return n_tokens
    if family == "resamplerQ":
        return n
    side = grid_side(n_tokens, kind)
    if family == "mlpNx_gelu_pos":
        return n_tokens
    if family == "mlpNx_gelu_cols":
        return 2 * n_tokens
    if family == "mlpNx_gelu_newline":
        return side * (side + 1)
    if family in ("avgpoolK_mlp2x_gelu", "shuffleK_mlp2x_gelu", "ldp"):
        k = 2 if family == "ldp" else n  # ldp: one stride-2 conv
        if side % k:
            raise ConfigError(f"projector {kind!r}: the {side}x{side} patch grid (N={n_tokens}) does not "
                              f"divide by {k}")
        return (side // k) ** 2
    # cabstractor: adaptive pooling to M tokens, or to half the grid per side
    if n is None:
        if side < 2:
            raise ConfigError(f"projector {kind!r}: a {side}x{side} patch grid (N={n_tokens}) has no half")
        return (side // 2) ** 2
    out = math.isqrt(n)
    if out * out != n or out > side:
        raise ConfigError(f"projector {kind!r}: M={n} output tokens must be a square grid no larger than "
                          f"the {side}x{side} patch grid (N={n_tokens})")
    return n


@dataclass
class ProjectorConfig:
    kind: str = "mlp2x_gelu"  # a name matching one of PROJECTORS' patterns
    bias: bool = True  # on the projector's linear layers

    def __post_init__(self):
        parse_projector(self.kind)  # an unknown name fails here, listing the known ones


# --- which config.json is this? -------------------------------------------------------

SUPPORTED_FORMATS = ("llava", "llava_next")  # llava-hf model_type values detect_format accepts
# The original LLaVA repository (haotian-liu/LLaVA) saves a flat LLaMA/Mistral/MPT config plus
# top-level mm_* fields; its tower is named, not stored (mm_vision_tower).
ORIGINAL_MODEL_TYPES = ("llava", "llava_llama", "llava_mistral", "llava_mpt")
ORIGINAL_FIELDS = ("mm_vision_tower", "mm_projector_type", "mm_hidden_size")


def detect_format(d: dict, source: str = "config.json") -> str:
    """'llava' (llava-hf LLaVA-1.5) or 'llava_next' (llava-hf LLaVA-NeXT), from config.json's
    model_type; an original-repository config or any other model_type is a ConfigError saying
    what was found and what to do."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
    kind = d.get("model_type")
    nested = "vision_config" in d or "text_config" in d
    original = [k for k in ORIGINAL_FIELDS if k in d]
    if original and not nested and kind in ORIGINAL_MODEL_TYPES + (None,):
        raise ConfigError(
            f"{source}: an original LLaVA checkpoint (model_type={kind!r}, top-level "
            f"{', '.join(original)}; no vision_config/text_config), not a llava-hf one. Convert it "
            "first: llava-core convert SRC DST --vision-tower CLIP_DIR (CLIP_DIR: the CLIP vision "
            f"folder it names, {d.get('mm_vision_tower', 'mm_vision_tower')!r})")
    if kind is None:
        return "llava"  # hand-written or very old llava-hf files may omit it
    if kind in SUPPORTED_FORMATS:
        return kind
    raise ConfigError(f"{source}: model_type={kind!r} is not a LLaVA config llava_core reads; "
                      f"supported: {', '.join(map(repr, SUPPORTED_FORMATS))} (llava-hf layout), or an "
                      "original LLaVA checkpoint after `llava-core convert`")


@dataclass
class LlavaConfig:
    MODEL_TYPE: ClassVar[str] = "llava"  # config.json's model_type
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    image_token_index: int = 32000
    vision_feature_layer: int | list[int] = -2  # hidden_states index, as in transformers
    vision_feature_select_strategy: str = "default"  # "default" drops CLS, "full" keeps it
    image_seq_length: int | None = None  # cross-check only; derived value is num_image_tokens

    def __post_init__(self):
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ConfigError(f"vision_feature_select_strategy={self.vision_feature_select_strategy!r} "
                              "is not supported (default or full)")
        n = self.vision.num_hidden_layers
        for layer in self.feature_layers:
            if not (-n <= layer <= n) or layer == 0:
                raise ConfigError(f"vision_feature_layer={layer} is out of range for a {n}-layer "
                                  f"tower (use -{n}..-1 or 1..{n}; 0, the embeddings, is not supported)")
        kind = self.projector.kind
        family, _ = parse_projector(kind)
        if family == "identity" and self.vision_feature_dim != self.text.hidden_size:
            raise ConfigError(f"projector 'identity' needs equal widths, but the vision features are "
                              f"{self.vision_feature_dim}-d and text_config.hidden_size is {self.text.hidden_size}")
        if family in GRID_PROJECTORS and self.vision_feature_select_strategy == "full":
            raise ConfigError(f"projector {kind!r} works on the square patch grid and cannot take the CLS "
                              "token that vision_feature_select_strategy='full' keeps; use 'default'")
        # features per image out of the vision tower, then tokens per image out of the projector
        self.num_vision_tokens = self.vision.num_patches + (self.vision_feature_select_strategy == "full")
        self.num_image_tokens = projector_tokens(kind, self.num_vision_tokens)
        # transformers writes image_seq_length = patches (576) whatever the strategy and never reads
        # it back, so that value is accepted under "full" too, for projectors that keep one token
        # per feature; any other disagreement is an error.
        accepted = {self.num_image_tokens}
        if self.num_image_tokens == self.num_vision_tokens:
            accepted.add(self.vision.num_patches)
        if self.image_seq_length is not None and self.image_seq_length not in accepted:
            raise ConfigError(f"image_seq_length={self.image_seq_length} disagrees with the "
                              f"{self.num_image_tokens} image tokens that vision_config "
                              f"({self.vision.image_size}px, patch {self.vision.patch_size}), "
                              f"strategy {self.vision_feature_select_strategy!r} and projector "
                              f"{kind!r} produce")

    @property
    def feature_layers(self) -> list[int]:
        layers = self.vision_feature_layer
        return list(layers) if isinstance(layers, (list, tuple)) else [layers]

    @property
    def vision_feature_dim(self) -> int:
        return self.vision.hidden_size * len(self.feature_layers)

    # --- reading and writing llava-hf config.json ---------------------------------

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> "LlavaConfig":
        try:
            return cls._from_hf_dict(d, source)
        except ConfigError as e:  # the dataclasses' own checks do not know the file: name it
            msg = str(e)
            raise ConfigError(msg if msg.startswith(source) else f"{source}: {msg}") from None

    @classmethod
    def _from_hf_dict(cls, d: dict, source: str) -> "LlavaConfig":
        fmt = detect_format(d, source)
        if fmt != cls.MODEL_TYPE:
            raise ConfigError(f"{source}: model_type={fmt!r}, expected {cls.MODEL_TYPE!r} "
                              "(next_config.read_config picks the config class by model_type)")
        vd = dict(d["vision_config"] if d.get("vision_config") is not None else LLAVA_DEFAULT_VISION)
        td = dict(d.get("text_config") or {})
        if vd.get("model_type", "clip_vision_model") not in ("clip_vision_model", "clip"):
            raise ConfigError(f"{source}: vision_config.model_type={vd.get('model_type')!r} is not "
                              "supported (clip_vision_model)")
        td = _text_defaults(td, source)
        vision = VisionConfig(**_pick(vd, VisionConfig, source, "vision_config"))

        # rope settings: transformers 5 keeps them in rope_parameters, older files at top level.
        rope = dict(td.pop("rope_parameters", None) or {})
        if "rope_theta" in rope:
            td.setdefault("rope_theta", rope.pop("rope_theta"))
        if rope.get("rope_type", "default") != "default":
            td.setdefault("rope_scaling", rope)
        for key, ok in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu"),
                        ("pretraining_tp", 1)):
            if td.get(key, ok) != ok:
                raise ConfigError(f"{source}: text_config.{key}={td[key]!r} is not supported ({ok!r})")
        if "vocab_size" not in td and "vocab_size" in d:  # some hub configs put it at top level
            td["vocab_size"] = d["vocab_size"]
        # tie_word_embeddings: tied if either level says so, as transformers' LlavaConfig reads it
        # (a top-level true with a text-level false still ties, and save_pretrained omits lm_head).
        td["tie_word_embeddings"] = bool(td.get("tie_word_embeddings", False) or d.get("tie_word_embeddings", False))
        if "pad_token_id" not in td or td["pad_token_id"] is None:
            td["pad_token_id"] = d.get("pad_token_id")
        text = TextConfig(**_pick(td, TextConfig, source, "text_config"))

        act = d.get("projector_hidden_act", "gelu")
        if act != "gelu":
            raise ConfigError(f"{source}: projector_hidden_act={act!r} is not supported (gelu)")
        kind = d.get("llava_core_projector", "mlp2x_gelu")
        projector = ProjectorConfig(kind=kind, bias=d.get("multimodal_projector_bias", True))
        return cls(
            vision=vision, text=text, projector=projector,
            image_token_index=d.get("image_token_index", d.get("image_token_id", 32000)),
            vision_feature_layer=d.get("vision_feature_layer", -2),
            vision_feature_select_strategy=d.get("vision_feature_select_strategy", "default"),
            image_seq_length=d.get("image_seq_length"),
            **cls._extra_from_hf_dict(d, source),
        )

    @classmethod
    def _extra_from_hf_dict(cls, d: dict, source: str) -> dict:
        """The fields a subclass (next_config.LlavaNextConfig) reads beyond these."""
        return {}

    @classmethod
    def from_json(cls, path: str | Path) -> "LlavaConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no config.json (is this a llava-hf checkpoint folder?)")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(d, source=str(path))


# The tower transformers' LlavaConfig builds when config.json has no vision_config at all
# (CLIP ViT-L/14-336); a vision_config that is present but sparse falls back to VisionConfig's
# defaults, which are CLIPVisionConfig's.
LLAVA_DEFAULT_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                            num_attention_heads=16, image_size=336, patch_size=14)

# Fields transformers writes that change nothing we compute.
_IGNORED = {
    "model_type", "architectures", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
    "initializer_range", "initializer_factor", "attention_dropout", "dropout", "projection_dim",
    "use_cache", "vocab_size_unused", "output_attentions", "output_hidden_states", "return_dict",
    "attention_bias", "mlp_bias", "hidden_act", "pretraining_tp", "id2label", "label2id",
    "problem_type", "chunk_size_feed_forward", "is_encoder_decoder", "add_cross_attention",
    "tie_encoder_decoder", "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id",
    "task_specific_params", "cross_attention_hidden_size", "finetuning_task", "bad_words_ids",
    "begin_suppress_tokens", "suppress_tokens", "use_bfloat16", "tf_legacy_loss", "pruned_heads",
    "torchscript", "vocab_size", "layer_types", "max_window_layers", "use_sliding_window",
}


# --- text decoders other than LLaMA ---------------------------------------------------
# A decoder is accepted when its weights and arithmetic are LLaMA's (separate q/k/v without
# bias, SwiGLU, RMSNorm, rotate_half rotary) up to fields TextConfig honours. Mistral is that,
# plus a sliding attention window. Qwen2 (q/k/v biases), Gemma (scaled embeddings, GeGLU, norm
# offset) and the rest are not, and are refused by name.

# MistralConfig's defaults (transformers) where they differ from LlamaConfig's: a sparse hub file
# (bakLlava names only a few fields) must read as transformers reads it.
MISTRAL_DEFAULTS = dict(intermediate_size=14336, num_key_value_heads=8, max_position_embeddings=4096 * 32,
                        sliding_window=4096)
TEXT_MODEL_TYPES = ("llama", "mistral")


def _text_defaults(td: dict, source: str) -> dict:
    """text_config -> the same with the defaults of its model_type filled in; refuse decoders that
    are not LLaMA-shaped, and a sliding window on a decoder whose transformers class ignores it."""
    kind = td.get("model_type", "llama")
    if kind not in TEXT_MODEL_TYPES:
        raise ConfigError(f"{source}: text_config.model_type={kind!r} is not supported "
                          f"({', '.join(TEXT_MODEL_TYPES)}: LLaMA-shaped decoders)")
    td = dict(td)
    if kind == "mistral":
        for key, value in MISTRAL_DEFAULTS.items():
            td.setdefault(key, value)
    elif td.get("sliding_window") is not None:
        raise ConfigError(f"{source}: text_config.sliding_window={td['sliding_window']!r} with model_type "
                          "'llama': transformers' LLaMA attends to the whole context, so the window "
                          "would mean something different here; remove it or use model_type 'mistral'")
    else:
        td.pop("sliding_window", None)
    return td


def _pick(d: dict, klass, source: str, section: str) -> dict:
    """Keep the fields `klass` knows; refuse any unknown field that would change the computation."""
    known = set(klass.__dataclass_fields__)
    out = {}
    for key, value in d.items():
        if key in known:
            out[key] = value
        elif key in _IGNORED or key.startswith("_") or key.endswith("_token_id") or key.endswith("dropout"):
            continue
        elif key in _GENERATION_KEYS:
            continue
        else:
            raise ConfigError(f"{source}: {section}.{key}={value!r} is a setting llava_core does not "
                              "know how to honour")
    return out


# Generation defaults that old configs carry at model level; they do not change the forward pass.
_GENERATION_KEYS = {
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "num_return_sequences",
    "output_scores", "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "chunk_size_feed_forward",
}
