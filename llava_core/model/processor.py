"""LLaVA's processor: CLIP image preprocessing, the chat prompt, and `<image>` expansion.

Reads a llava-hf folder: `config.json`, `preprocessor_config.json` (a CLIPImageProcessor),
`processor_config.json`, the tokenizer files and the chat template (`chat_template.json`,
`chat_template.jinja` or the tokenizer's). Images follow CLIPImageProcessor's PIL path:
RGB -> bicubic resize of the shortest edge -> center crop -> rescale -> normalise, in
plain PIL + numpy. `image_aspect_ratio="pad"` first pastes the image on a square of the
mean colour, as the original LLaVA-1.5 repo does (`llava/mm_utils.py: expand2square`);
"crop", the default, is what llava-hf / transformers do.

Each `<image>` in a prompt becomes `cfg.num_image_tokens` copies of `cfg.image_token_index`.
The expansion happens on token ids, after the tokenizer has kept `<image>` as one id, so the
text around it tokenises exactly as transformers' LlavaProcessor tokenises it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .config import ConfigError, LlavaConfig
from .image_io import ProcessorError, load_image, resize_then_crop  # noqa: F401 (re-exported)
from .text_guard import check_messages, check_user_text, check_utf8, load_tokenizer, special_strings

log = logging.getLogger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# LLaVA's conv_vicuna_v1 (llava/conversation.py): sep " " after a user turn, sep2 "</s>" after
# an assistant turn, system prompt first.
VICUNA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the human's questions.")
TEMPLATES = ("checkpoint", "llava15", "vicuna_v1")
_CLIP_PROCESSORS = frozenset({None, "CLIPImageProcessor", "CLIPImageProcessorFast", "CLIPImageProcessorPil"})
# transformers' LlavaImageProcessor is CLIP's plus `do_pad` (LLaVA-1.5's expand2square, our "pad")
_LLAVA_PROCESSORS = frozenset({"LlavaImageProcessor", "LlavaImageProcessorFast", "LlavaImageProcessorPil"})


@dataclass
class ImageConfig:
    # CLIPImageProcessor defaults, except sizes: those default to the vision tower's image_size.
    shortest_edge: int | None = 336  # None: resize to (height, width) exactly
    resize_hw: tuple[int, int] | None = None
    crop_hw: tuple[int, int] = (336, 336)
    do_resize: bool = True
    resample: int = 3  # PIL bicubic
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    do_convert_rgb: bool = True
    do_pad: bool = False  # LlavaImageProcessor only: the default for image_aspect_ratio ("pad")

    @classmethod
    def from_json(cls, path: Path, image_size: int, kinds: frozenset = _CLIP_PROCESSORS | _LLAVA_PROCESSORS
                  ) -> "ImageConfig":
        d = json.loads(path.read_text()) if path.is_file() else {}
        kind = d.get("image_processor_type")
        if kind not in kinds:
            raise ConfigError(f"{path}: image_processor_type={kind!r} is not supported "
                              f"({', '.join(sorted(k for k in kinds if k))})")
        size = d.get("size", {"shortest_edge": image_size})
        if isinstance(size, int):
            size = {"shortest_edge": size}
        crop = d.get("crop_size", {"height": image_size, "width": image_size})
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        if "shortest_edge" in size:
            shortest, resize_hw = size["shortest_edge"], None
        elif "height" in size and "width" in size:
            shortest, resize_hw = None, (size["height"], size["width"])
        else:
            raise ConfigError(f"{path}: size={size!r} needs shortest_edge, or height and width")
        out = cls(shortest_edge=shortest, resize_hw=resize_hw, crop_hw=(crop["height"], crop["width"]),
                  **{k: d[k] for k in ("do_resize", "resample", "do_center_crop", "do_rescale",
                                       "rescale_factor", "do_normalize", "do_convert_rgb") if k in d},
                  do_pad=kind in _LLAVA_PROCESSORS and bool(d.get("do_pad", False)),
                  **{k: tuple(d[k]) for k in ("image_mean", "image_std") if k in d})
        if out.output_hw != (image_size, image_size):
            raise ConfigError(f"{path}: images come out {out.output_hw} (size {size}, crop_size {crop}, "
                              f"do_center_crop={out.do_center_crop}) but the vision tower takes "
                              f"{image_size}x{image_size}")
        return out

    @property
    def output_hw(self) -> tuple[int, int] | None:
        if self.do_center_crop:
            return self.crop_hw
        return self.resize_hw if self.do_resize else None  # shortest-edge alone keeps the aspect ratio


class LlavaProcessor:
    def __init__(self, cfg: LlavaConfig, tokenizer, image_cfg: ImageConfig,
                 chat_template: str | None = None, template: str | None = None,
                 image_aspect_ratio: str = "crop"):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.image_cfg = image_cfg
        self.chat_template = chat_template  # the checkpoint's jinja template, if it has one
        template = template or ("checkpoint" if chat_template else "llava15")
        if template not in TEMPLATES:
            raise ValueError(f"template={template!r}: expected one of {TEMPLATES}")
        if template == "checkpoint" and not chat_template:
            raise ConfigError("template='checkpoint' but the checkpoint has no chat template "
                              "(processor_config.json, chat_template.json, chat_template.jinja, tokenizer)")
        if template == "llava15" and chat_template is None:
            log.info("no chat template in the checkpoint; using the llava-1.5-hf format")
        self.template = template
        if image_aspect_ratio not in ("crop", "pad"):
            raise ValueError(f"image_aspect_ratio={image_aspect_ratio!r}: expected 'crop' or 'pad'")
        self.image_aspect_ratio = image_aspect_ratio
        self.image_token_id = cfg.image_token_index
        self.image_token = tokenizer.convert_ids_to_tokens(self.image_token_id)
        one_id = tokenizer.encode(self.image_token, add_special_tokens=False) if self.image_token else None
        if one_id != [self.image_token_id]:
            raise ConfigError(f"the tokenizer does not keep image token id {self.image_token_id} "
                              f"({self.image_token!r}) as one token")
        pad = tokenizer.pad_token_id
        self.special_strings = special_strings(tokenizer)  # refused in user text (text_guard.py)
        self.pad_token_id = pad if pad is not None else cfg.text.pad_token_id

    @classmethod
    def from_pretrained(cls, path: str | Path, template: str | None = None,
                        image_aspect_ratio: str | None = None) -> "LlavaProcessor":
        """image_aspect_ratio None: "pad" if preprocessor_config.json is a LlavaImageProcessor with
        do_pad (as `llava-core convert` writes LLaVA-1.5's), else "crop"."""
        path = Path(path)
        cfg = LlavaConfig.from_json(path)
        image_cfg = ImageConfig.from_json(path / "preprocessor_config.json", cfg.vision.image_size)
        proc = read_json(path / "processor_config.json")
        check_image_tokens(cfg, image_cfg, proc, path / "processor_config.json")
        tokenizer = load_tokenizer(path)
        token = tokenizer.convert_ids_to_tokens(cfg.image_token_index)
        if proc.get("image_token") not in (None, token):
            raise ConfigError(f"{path / 'processor_config.json'}: image_token={proc['image_token']!r} but "
                              f"config.json's image_token_index {cfg.image_token_index} is {token!r} "
                              "in the tokenizer")
        return cls(cfg, tokenizer, image_cfg, read_chat_template(path, proc, tokenizer), template=template,
                   image_aspect_ratio=image_aspect_ratio or ("pad" if image_cfg.do_pad else "crop"))

    # --- images ------------------------------------------------------------------

    def preprocess(self, images, mode: str | None = None) -> torch.Tensor:
        """PIL images, file paths or uint8 (H, W[, C]) arrays -> (N, 3, H, W) float32."""
        mode = mode or self.image_aspect_ratio
        if mode not in ("crop", "pad"):
            raise ValueError(f"mode={mode!r}: expected 'crop' or 'pad'")
        if not isinstance(images, (list, tuple)):
            images = [images]
        return torch.stack([self._one_image(load_image(im, self.image_cfg.do_convert_rgb), mode)
                            for im in images])

    def _one_image(self, im: Image.Image, mode: str) -> torch.Tensor:
        c = self.image_cfg
        if mode == "pad":
            im = expand_to_square(im, tuple(int(x * 255) for x in c.image_mean))
        if c.do_resize:
            size = resize_size(im.size, c.shortest_edge, c.resize_hw)
            small = resize_then_crop(im, size, c.crop_hw, c.resample) if c.do_center_crop else None
            im = small or im.resize(size, resample=c.resample)
        x = np.asarray(im)  # (H, W, 3) uint8
        if c.do_center_crop:
            x = center_crop(x, c.crop_hw)
        if c.do_rescale:  # in float64, then float32, as CLIPImageProcessor rounds
            x = (x.astype(np.float64) * c.rescale_factor).astype(np.float32)
        else:
            x = x.astype(np.float32)
        if c.do_normalize:
            x = (x - np.array(c.image_mean, np.float32)) / np.array(c.image_std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))  # (H, W, 3) -> (3, H, W)

    # --- text --------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """transformers-style messages ({"role", "content": str | [{"type": "image"|"text"}, ...]}) -> prompt.
        Texts holding a special-token string are refused (ProcessorError; text_guard.py)."""
        check_messages(messages, self.special_strings)
        if self.template == "checkpoint":
            return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        render = _render_llava15 if self.template == "llava15" else _render_vicuna_v1
        return render(messages, add_generation_prompt, self.image_token)

    def prompt(self, question: str, n_images: int = 1) -> str:
        """One user turn: n_images images then the question, ready for the answer."""
        check_user_text(question, self.special_strings, "the question")
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
        return self.apply_chat_template([{"role": "user", "content": content}])

    def tokenize(self, text: str, truncation: bool = False, max_length: int | None = None) -> list[int]:
        """One prompt -> ids with every `<image>` expanded to num_image_tokens image-token ids."""
        check_utf8(text, "the prompt")
        n = self.cfg.num_image_tokens
        ids = []
        for i in self.tokenizer(text, add_special_tokens=True)["input_ids"]:
            ids.extend([i] * n if i == self.image_token_id else [i])
        return self._truncate(ids, max_length) if truncation and max_length is not None else ids

    def _truncate(self, ids: list[int], max_length: int) -> list[int]:
        """Cut on the tokenizer's truncation side; refuse to cut into image tokens."""
        if len(ids) <= max_length:
            return ids
        left = self.tokenizer.truncation_side == "left"
        cut = ids[:len(ids) - max_length] if left else ids[max_length:]
        if self.image_token_id in cut:
            raise ProcessorError(f"truncating to max_length={max_length} would cut image tokens: the prompt "
                                 f"is {len(ids)} tokens, {ids.count(self.image_token_id)} of them image tokens "
                                 f"({self.cfg.num_image_tokens} per image); raise max_length or shorten the text")
        return ids[-max_length:] if left else ids[:max_length]

    def _call_inputs(self, text, images, return_tensors) -> tuple[list[str] | None, list, list[int] | None]:
        """__call__'s arguments checked: (prompts or None, all images in reading order, images per
        prompt or None). NeXT's processor shares it."""
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors={return_tensors!r}: expected 'pt' or None")
        texts = None if text is None else [text] if isinstance(text, str) else list(text)
        if texts == []:
            raise ProcessorError("text is an empty list")
        flat, per_prompt = flatten_images(images, None if texts is None else len(texts))
        return texts, flat, per_prompt

    def __call__(self, text: str | list[str] | None = None, images=None, return_tensors: str | None = "pt",
                 padding: bool | str = True, truncation: bool = False, max_length: int | None = None) -> dict:
        """Prompts and their images -> input_ids (B, T), attention_mask (B, T), pixel_values (N, 3, H, W).

        `images` lists the images of all prompts in reading order (or one list per prompt); each
        prompt's `<image>` placeholders take them in turn. Batches are padded on the LEFT."""
        texts, flat, per_prompt = self._call_inputs(text, images, return_tensors)
        out = {}
        if texts is not None:
            rows = [self.tokenize(t) for t in texts]
            counts = [r.count(self.image_token_id) // self.cfg.num_image_tokens for r in rows]
            if sum(counts) != len(flat) or (per_prompt is not None and counts != per_prompt):
                given = per_prompt if per_prompt is not None else len(flat)
                raise ProcessorError(f"the prompts hold {sum(counts)} {self.image_token} placeholders "
                                     f"({counts} per prompt) but {given} images were given")
            if truncation and max_length is not None:
                rows = [self._truncate(r, max_length) for r in rows]
            out.update(self._pad(rows, padding, max_length, return_tensors))
        if flat:
            out["pixel_values"] = self.preprocess(flat)
        return out

    def _pad(self, rows: list[list[int]], padding: bool | str, max_length: int | None, return_tensors) -> dict:
        if padding not in (True, False, "longest", "max_length", "do_not_pad"):
            raise ValueError(f"padding={padding!r}: expected True, False, 'longest' or 'max_length'")
        longest = max(len(r) for r in rows)
        if padding == "max_length":
            if max_length is None or max_length < longest:
                raise ProcessorError(f"padding='max_length' needs max_length >= the longest prompt "
                                     f"({longest} tokens), got {max_length}")
            longest = max_length
        if padding in (False, "do_not_pad"):
            if return_tensors == "pt" and len({len(r) for r in rows}) > 1:
                raise ProcessorError(f"prompts of lengths {[len(r) for r in rows]} need padding=True "
                                     "to become one tensor")
            masks = [[1] * len(r) for r in rows]
        else:
            if self.pad_token_id is None and any(len(r) < longest for r in rows):
                raise ConfigError("the batch needs padding but neither the tokenizer nor config.json "
                                  "names a pad token")
            masks = [[0] * (longest - len(r)) + [1] * len(r) for r in rows]
            rows = [[self.pad_token_id] * (longest - len(r)) + r for r in rows]
        if return_tensors == "pt":
            return {"input_ids": torch.tensor(rows, dtype=torch.long),
                    "attention_mask": torch.tensor(masks, dtype=torch.long)}
        return {"input_ids": rows, "attention_mask": masks}

    def decode(self, ids, **kwargs) -> str:
        return self.tokenizer.decode(ids, **kwargs)

    def batch_decode(self, ids, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(ids, **kwargs)


# --- image helpers ---------------------------------------------------------------

def expand_to_square(im: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """Paste `im` centred on a square canvas of colour `fill` (LLaVA's expand2square)."""
    w, h = im.size
    if w == h:
        return im
    canvas = Image.new(im.mode, (max(w, h),) * 2, fill)
    canvas.paste(im, ((h - w) // 2, 0) if h > w else (0, (w - h) // 2))
    return canvas


def resize_size(wh: tuple[int, int], shortest_edge: int | None,
                resize_hw: tuple[int, int] | None) -> tuple[int, int]:
    """(width, height) after resizing: the shortest edge to `shortest_edge`, the long edge scaled
    and truncated to an int (CLIPImageProcessor's rule), or exactly `resize_hw`."""
    if shortest_edge is None:
        return resize_hw[1], resize_hw[0]
    w, h = wh
    if w <= h:
        return shortest_edge, int(shortest_edge * h / w)
    return int(shortest_edge * w / h), shortest_edge


def center_crop(x: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(H, W, C) -> (h, w, C) centred; an edge shorter than the crop is zero-padded around the image."""
    for axis, size in enumerate(hw):
        n = x.shape[axis]
        if n >= size:
            x = x.take(range((n - size) // 2, (n - size) // 2 + size), axis=axis)
        else:
            before = (size - n + 1) // 2
            pad = [(0, 0)] * x.ndim
            pad[axis] = (before, size - n - before)
            x = np.pad(x, pad)
    return x


# --- text helpers ----------------------------------------------------------------

def _parts(message: dict, image_token: str) -> tuple[str, str]:
    """A message's images as '<image>\\n' each, and its text."""
    content = message["content"]
    if isinstance(content, str):
        return "", content
    images = sum(1 for c in content if c["type"] == "image")
    return f"{image_token}\n" * images, " ".join(c["text"] for c in content if c["type"] == "text")


def _render_llava15(messages: list[dict], add_generation_prompt: bool, image_token: str) -> str:
    # "USER: <image>\n{text} ASSISTANT: {answer} USER: ..." (llava-1.5-hf; no system prompt)
    out = ""
    for m in messages:
        if m["role"] != "system":
            out += m["role"].upper() + ": "
        images, text = _parts(m, image_token)
        out += images + text + " "
    return out + ("ASSISTANT:" if add_generation_prompt else "")


def _render_vicuna_v1(messages: list[dict], add_generation_prompt: bool, image_token: str) -> str:
    # "{system} USER: <image>\n{q} ASSISTANT: {a}</s>USER: ..." (LLaVA's conv_vicuna_v1, SeparatorStyle.TWO)
    system = VICUNA_V1_SYSTEM
    out = ""
    for m in messages:
        images, text = _parts(m, image_token)
        if m["role"] == "system":
            system = text
        elif m["role"] in ("user", "assistant"):
            out += f"{m['role'].upper()}: {images}{text}" + (" " if m["role"] == "user" else "</s>")
        else:
            raise ValueError(f"role={m['role']!r}: vicuna_v1 knows system, user and assistant")
    return system + " " + out + ("ASSISTANT:" if add_generation_prompt else "")


def flatten_images(images, n_prompts: int | None) -> tuple[list, list[int] | None]:
    """images -> (all images in reading order, per-prompt counts if given as one list per prompt)."""
    if images is None:
        return [], None
    if not isinstance(images, (list, tuple)):
        return [images], None
    if images and all(isinstance(i, (list, tuple)) for i in images):
        if n_prompts is not None and len(images) != n_prompts:
            raise ProcessorError(f"images holds {len(images)} lists but there are {n_prompts} prompts")
        return [im for row in images for im in row], [len(row) for row in images]
    return list(images), None


# --- checkpoint files ------------------------------------------------------------

def read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def check_image_tokens(cfg: LlavaConfig, image_cfg: ImageConfig, proc: dict, source: Path) -> None:
    """processor_config.json's patch_size / num_additional_image_tokens must give our count of
    vision-tower tokens: what transformers' LlavaProcessor expands `<image>` to, and what a
    one-token-per-feature projector emits. A token-reducing projector (config.projector_tokens)
    then turns those into cfg.num_image_tokens, the count tokenize() uses."""
    if proc.get("patch_size") is None:
        return
    h, w = image_cfg.output_hw
    n = (h // proc["patch_size"]) * (w // proc["patch_size"]) + proc.get("num_additional_image_tokens", 0)
    n -= proc.get("vision_feature_select_strategy") == "default"
    if n != cfg.num_vision_tokens:
        raise ConfigError(f"{source}: patch_size {proc['patch_size']}, num_additional_image_tokens "
                          f"{proc.get('num_additional_image_tokens', 0)} and strategy "
                          f"{proc.get('vision_feature_select_strategy')!r} give {n} image tokens per image, "
                          f"but config.json's vision tower gives {cfg.num_vision_tokens}")


def read_chat_template(path: Path, proc: dict, tokenizer) -> str | None:
    """The checkpoint's template, looked for where transformers looks, in its order."""
    template = proc.get("chat_template")
    if template is None and (path / "chat_template.json").is_file():
        template = read_json(path / "chat_template.json").get("chat_template")
    if template is None and (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text()
    if template is None:
        template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: LLaVA prompts use the default one
        template = template.get("default")
    return template or None
