"""Tiny random checkpoints in the exact llava-hf format, written by transformers itself.

No machine of this project can download weights, so tests, the placeholder in
`weights/` and the benchmarks all stand on checkpoints made here: a random
`LlavaForConditionalGeneration` saved with `save_pretrained`, optionally rewritten
to the transformers-4.x hub layout (`vision_tower.vision_model.*`), sharded or cast
to fp16, plus a small sentencepiece tokenizer (byte fallback, like LLaMA's) with
`<image>` and `<pad>` added after the vocabulary, as llava-hf does.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from .atomic import atomic_save_file

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# The llava-1.5-hf conversation format: "USER: <image>\n{text} ASSISTANT: {answer} USER: ..."
LLAVA15_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] + ' ' }}{% endif %}{% endfor %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

_CORPUS = [
    "What is in the image? Describe the picture in one sentence.",
    "A red circle is to the left of a blue square on a white background.",
    "USER: ASSISTANT: How many shapes are there? There are three shapes.",
    "Read all the text in the image. The sign says OPEN 24 HOURS.",
    "What is the title of the document? What is the total? The total is 42.50 dollars.",
    "yes no left right top bottom green yellow purple orange black white gray triangle star",
    "The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ?",
    "Größe café naïve façade — “quotes” 日本語のテキスト 中文 😀 emoji",
]


def make_tokenizer(folder: str | Path, vocab: int = 400, llava_tokens: bool = True) -> tuple[int, int] | None:
    """Train a small BPE sentencepiece tokenizer and save it as a LLaMA tokenizer with
    `<image>` and `<pad>` appended. Returns (image_token_id, pad_token_id). With
    llava_tokens=False it is saved as the original LLaVA repo keeps vicuna's: no `<image>`, no
    `<pad>`, no chat template (returns None)."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(_CORPUS * 4), model_prefix=f"{tmp}/tokenizer", vocab_size=vocab,
            model_type="bpe", byte_fallback=True, character_coverage=1.0, split_digits=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True,
            normalization_rule_name="identity", num_threads=1, minloglevel=2)
        src = Path(tmp) / "src"
        src.mkdir()
        shutil.copy(f"{tmp}/tokenizer.model", src / "tokenizer.model")
        tok = LlamaTokenizer.from_pretrained(str(src), legacy=False, add_bos_token=True)
    if not llava_tokens:
        tok.save_pretrained(str(folder))
        return None
    tok.add_tokens(["<image>"], special_tokens=True)
    tok.add_special_tokens({"pad_token": "<pad>"})
    tok.chat_template = LLAVA15_CHAT_TEMPLATE
    tok.save_pretrained(str(folder))
    return tok.convert_tokens_to_ids("<image>"), tok.convert_tokens_to_ids("<pad>")


def tiny_hf_config(image_token_index: int, pad_token_id: int, vocab_size: int = 416, *,
                   text: dict | None = None, vision: dict | None = None, **top):
    """A transformers LlavaConfig small enough for tests: 336-px images, 14-px patches (576 tokens)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, MistralConfig

    v = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
             image_size=336, patch_size=14, projection_dim=32)
    v.update(vision or {})
    t = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=2048,
             rms_norm_eps=1e-5, pad_token_id=pad_token_id, bos_token_id=1, eos_token_id=2)
    t.update(text or {})
    text_class = MistralConfig if t.pop("model_type", "llama") == "mistral" else LlamaConfig  # bakLlava: mistral
    config_class = top.pop("config_class", LlavaConfig)  # llava_next: transformers' LlavaNextConfig
    return config_class(vision_config=CLIPVisionConfig(**v), text_config=text_class(**t),
                        image_token_index=image_token_index, pad_token_id=pad_token_id, **top)


def make_tiny_checkpoint(folder: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                         layout: str = "hf5", shard_size: str | None = None,
                         text: dict | None = None, vision: dict | None = None, **top) -> Path:
    """Write a random llava-hf checkpoint folder (weights, config, tokenizer, processor files).

    layout: "hf5" as transformers 5 saves it (`vision_tower.*`), or "hub" rewritten to the
    transformers-4.x layout of the hub files (`vision_tower.vision_model.*`).
    """
    from transformers import LlavaForConditionalGeneration

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image_id, pad_id = make_tokenizer(folder)
    cfg = tiny_hf_config(image_id, pad_id, text=text, vision=vision, **top)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).to(dtype).eval()
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(str(folder), **kwargs)
    if layout == "hub":
        to_hub_layout(folder)
    elif layout != "hf5":
        raise ValueError(f"layout={layout!r}: expected 'hf5' or 'hub'")
    write_processor_files(folder, cfg)
    return folder


def write_processor_files(folder: Path, cfg) -> None:
    """preprocessor_config.json, processor_config.json and chat_template.json as llava-hf ships
    them, for a transformers LlavaConfig (export.write_processor_files reads ours)."""
    from .checkpoints.export import write_processor_files as write
    from .model.config import LlavaConfig

    write(folder, LlavaConfig.from_hf_dict(cfg.to_dict()), "<image>", LLAVA15_CHAT_TEMPLATE)


def to_hub_layout(folder: Path) -> None:
    """Rename `vision_tower.X` to `vision_tower.vision_model.X` in every weight file, as the
    hub checkpoints written by transformers 4.x name them."""
    from safetensors.torch import load_file

    def rename(k: str) -> str:
        if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model."):
            return "vision_tower.vision_model." + k[len("vision_tower."):]
        return k

    for f in sorted(folder.glob("*.safetensors")):
        sd = {rename(k): v for k, v in load_file(str(f)).items()}
        atomic_save_file(sd, f, metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        d = json.loads(index.read_text())
        d["weight_map"] = {rename(k): v for k, v in d["weight_map"].items()}
        index.write_text(json.dumps(d, indent=2))


# --- LLaVA-NeXT ------------------------------------------------------------------------
# A 32-px tower with 8-px patches (4 x 4 patches per tile) and pinpoints of 1 x 2, 2 x 1 and
# 2 x 2 tiles: tiny, but every branch of the tiling and unpadding is exercised.
NEXT_VISION = dict(image_size=32, patch_size=8, num_hidden_layers=2)
NEXT_PINPOINTS = [[32, 64], [64, 32], [64, 64]]


def make_tiny_next_checkpoint(folder: str | Path, *, seed: int = 0, text: dict | None = None,
                              vision: dict | None = None, pinpoints: list | None = None,
                              chat_template: str | None = None, **top) -> Path:
    """Write a random llava-hf llava_next checkpoint folder (transformers 5 layout) with the
    processor files transformers' LlavaNextProcessor reads."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image_id, pad_id = make_tokenizer(folder)
    pins = pinpoints or NEXT_PINPOINTS
    cfg = tiny_hf_config(image_id, pad_id, text=text, vision={**NEXT_VISION, **(vision or {})},
                         config_class=LlavaNextConfig, image_grid_pinpoints=pins, **top)
    torch.manual_seed(seed)
    LlavaNextForConditionalGeneration(cfg).eval().save_pretrained(str(folder))
    size = cfg.vision_config.image_size
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "LlavaNextImageProcessor", "processor_class": "LlavaNextProcessor",
        "do_resize": True, "size": {"shortest_edge": size}, "resample": 3,
        "do_center_crop": True, "crop_size": {"height": size, "width": size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_pad": True,
        "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "do_convert_rgb": True,
        "image_grid_pinpoints": pins}, indent=2))
    (folder / "processor_config.json").write_text(json.dumps({
        "processor_class": "LlavaNextProcessor", "patch_size": cfg.vision_config.patch_size,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        "num_additional_image_tokens": 1, "image_token": "<image>"}, indent=2))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": chat_template or LLAVA15_CHAT_TEMPLATE}))
    return folder


def reference_processor(folder: str | Path):
    """transformers' processor for a checkpoint folder, the tests' oracle: the PIL image backend
    (the one whose resizing ours follows), left padding (as ours pads, and batched generation needs)."""
    from transformers import AutoProcessor
    proc = AutoProcessor.from_pretrained(folder, backend="pil")
    backend = proc.image_processor.backend
    assert backend == "pil", f"{folder}: transformers gave the {backend} image backend"
    proc.tokenizer.padding_side = "left"
    return proc


def random_image(seed: int, size: tuple[int, int] = (300, 200)):
    """A (width, height) RGB PIL image of seeded uniform noise."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy())


# A Mistral-instruct chat template ([INST] ... [/INST]) as bakLlava / llava-v1.6-mistral checkpoints
# carry one, for tests that check a checkpoint's own template is used as it is.
MISTRAL_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{{ ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '</s>' }}{% endif %}"
    "{% endfor %}"
)


def transformers_embeds(hf, input_ids: torch.Tensor, pixel_values: torch.Tensor, image_token_index: int,
                        projector: str = "mlp2x_gelu", newline: torch.Tensor | None = None) -> torch.Tensor:
    """The input embeddings transformers' LlavaForConditionalGeneration `hf` would build for one
    prompt, with its own tower and MLP's image features in the image tokens' places; for
    `mlp2x_gelu_cols` (MLP tensors as mlp2x_gelu's, which transformers loads) the features
    follow again in column-major order; for `mlp2x_gelu_newline` the vector `newline` (D,), read
    from the checkpoint by the caller (transformers' Llava has no such tensor), follows each row.
    The oracle for models transformers cannot run whole.
    input_ids (1, T), pixel_values (1, 3, H, W) -> (1, T, D)."""
    feats = hf.get_image_features(pixel_values=pixel_values, vision_feature_layer=hf.config.vision_feature_layer,
                                  vision_feature_select_strategy=hf.config.vision_feature_select_strategy)
    feats = feats.pooler_output[0]  # (N, D)
    side = round(feats.shape[0] ** 0.5)
    if projector == "mlp2x_gelu_cols":
        from .research.token_order import reorder_grid

        feats = torch.cat([feats, reorder_grid(feats[None], side, side, "transposed")[0]])  # (2N, D)
    elif projector == "mlp2x_gelu_newline":
        if newline is None:
            raise ValueError("transformers_embeds: projector 'mlp2x_gelu_newline' needs its newline vector")
        rows = feats.view(side, side, -1)  # (s, s, D)
        feats = torch.cat([rows, newline.to(feats.dtype).expand(side, 1, -1)], dim=1).flatten(0, 1)  # (s*(s+1), D)
    elif projector != "mlp2x_gelu":
        raise ValueError(f"transformers_embeds: projector {projector!r}: transformers has no counterpart")
    image = input_ids == image_token_index
    embeds = hf.get_input_embeddings()(input_ids.masked_fill(image, 0))  # (1, T, D)
    if int(image.sum()) != feats.shape[0]:
        raise ValueError(f"transformers_embeds: {int(image.sum())} image tokens in input_ids, "
                         f"{feats.shape[0]} image features")
    embeds[image] = feats.to(embeds.dtype)
    return embeds
