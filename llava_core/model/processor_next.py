"""LLaVA-NeXT's processor: any-resolution tiles per image, and `<image>` expanded per image.

Reads a llava-hf llava-v1.6 folder (`preprocessor_config.json` of a LlavaNextImageProcessor with
its `image_grid_pinpoints`). Each image follows transformers' PIL path (anyres.py has the
geometry):
  1. the best-fit resolution from the pinpoints; the image resized (bicubic) to fit inside it,
     aspect ratio kept, and pasted centred on black at that resolution;
  2. that canvas cut into tower-sized tiles, row by row;
  3. the base tile: the whole image resized to a square tile, aspect ratio NOT kept;
  4. every tile, base first, through LLaVA-1.5's CLIP steps (a no-op resize and crop at tile
     size, then rescale and normalise).
A batch pads each image's tile stack with all-zero tiles to the longest, so pixel_values is
(N, P, 3, S, S), with image_sizes (N, 2) the original (height, width) that the model needs to
undo the padding. Each `<image>` becomes as many image tokens as its image gives features
(LlavaNextConfig.image_tokens), in reading order, exactly as transformers' LlavaNextProcessor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .anyres import fit_within, padding, select_best_resolution
from .config import ConfigError
from .next_config import LlavaNextConfig
from .processor import (ImageConfig, LlavaProcessor, ProcessorError, check_image_tokens, load_image, read_chat_template,
                        read_json)
from .text_guard import load_tokenizer

_NEXT_PROCESSORS = {None, "LlavaNextImageProcessor", "LlavaNextImageProcessorFast", "LlavaNextImageProcessorPil"}


class LlavaNextProcessor(LlavaProcessor):
    cfg: LlavaNextConfig

    @classmethod
    def from_pretrained(cls, path: str | Path, template: str | None = None) -> "LlavaNextProcessor":
        path = Path(path)
        cfg = LlavaNextConfig.from_json(path)
        pre = path / "preprocessor_config.json"
        image_cfg = ImageConfig.from_json(pre, cfg.vision.image_size, kinds=_NEXT_PROCESSORS)
        if image_cfg.shortest_edge != cfg.vision.image_size or not image_cfg.do_resize:
            raise ConfigError(f"{pre}: llava_next tiles are resized to size.shortest_edge "
                              f"{image_cfg.shortest_edge} (do_resize={image_cfg.do_resize}), but the "
                              f"vision tower takes {cfg.vision.image_size}")
        pins = read_json(pre).get("image_grid_pinpoints")
        if pins is not None and [tuple(p) for p in pins] != cfg.image_grid_pinpoints:
            raise ConfigError(f"{pre}: image_grid_pinpoints {pins} differ from config.json's "
                              f"{[list(p) for p in cfg.image_grid_pinpoints]}; the processor would count "
                              "tokens for tiles the model does not make")
        proc = read_json(path / "processor_config.json")
        check_image_tokens(cfg, image_cfg, proc, path / "processor_config.json")
        tokenizer = load_tokenizer(path)
        return cls(cfg, tokenizer, image_cfg, read_chat_template(path, proc, tokenizer), template=template)

    # --- images ------------------------------------------------------------------

    def preprocess(self, images, mode: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """PIL images, file paths or arrays -> pixel_values (N, P, 3, S, S), image_sizes (N, 2)."""
        if mode not in (None, "crop"):
            raise ValueError(f"mode={mode!r}: llava_next tiles the image; it has no 'pad' mode")
        if not isinstance(images, (list, tuple)):
            images = [images]
        stacks, sizes = [], []
        for im in images:
            im = load_image(im, self.image_cfg.do_convert_rgb)
            stacks.append(torch.stack([self._one_image(t, "crop") for t in self.tiles(im)]))  # (n, 3, S, S)
            sizes.append((im.height, im.width))
        most = max(s.shape[0] for s in stacks)
        pixel_values = torch.stack([torch.cat([s, s.new_zeros(most - s.shape[0], *s.shape[1:])]) for s in stacks])
        return pixel_values, torch.tensor(sizes, dtype=torch.long)

    def tiles(self, im: Image.Image) -> list[Image.Image]:
        """One RGB image -> its base tile, then its grid's tiles row by row (PIL, S x S each)."""
        S = self.cfg.vision.image_size
        resample = self.image_cfg.resample
        best_h, best_w = select_best_resolution((im.height, im.width), self.cfg.image_grid_pinpoints)
        h, w = fit_within((im.height, im.width), (best_h, best_w))
        top, _, left, _ = padding((h, w), (best_h, best_w))
        canvas = Image.new("RGB", (best_w, best_h), (0, 0, 0))
        canvas.paste(im.resize((w, h), resample=resample), (left, top))
        grid = [canvas.crop((x, y, x + S, y + S)) for y in range(0, best_h, S) for x in range(0, best_w, S)]
        return [im.resize((S, S), resample=resample)] + grid

    # --- text --------------------------------------------------------------------

    def tokenize(self, text: str, image_sizes: list[tuple[int, int]] | None = None, truncation: bool = False,
                 max_length: int | None = None) -> list[int]:
        """One prompt -> ids with its k-th `<image>` expanded to the token count of image_sizes[k]."""
        ids = self._expand(self.tokenizer(text, add_special_tokens=True)["input_ids"], image_sizes or [])
        return self._truncate(ids, max_length) if truncation and max_length is not None else ids

    def _expand(self, ids: list[int], image_sizes: list[tuple[int, int]]) -> list[int]:
        out, k = [], 0
        for i in ids:
            if i != self.image_token_id:
                out.append(i)
                continue
            if k >= len(image_sizes):
                raise ProcessorError(f"the prompt holds more {self.image_token} placeholders than the "
                                     f"{len(image_sizes)} image size(s) given")
            out.extend([i] * self.cfg.image_tokens(image_sizes[k]))
            k += 1
        return out

    def __call__(self, text: str | list[str] | None = None, images=None, return_tensors: str | None = "pt",
                 padding: bool | str = True, truncation: bool = False, max_length: int | None = None) -> dict:
        """Prompts and their images -> input_ids (B, T), attention_mask (B, T), pixel_values
        (N, P, 3, S, S), image_sizes (N, 2). Images in reading order (or one list per prompt);
        batches padded on the LEFT."""
        texts, flat, per_prompt = self._call_inputs(text, images, return_tensors)
        out = {}
        if flat:
            out["pixel_values"], out["image_sizes"] = self.preprocess(flat)
        if texts is not None:
            raw = [self.tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
            counts = [r.count(self.image_token_id) for r in raw]
            if sum(counts) != len(flat) or (per_prompt is not None and counts != per_prompt):
                given = per_prompt if per_prompt is not None else len(flat)
                raise ProcessorError(f"the prompts hold {sum(counts)} {self.image_token} placeholders "
                                     f"({counts} per prompt) but {given} images were given")
            sizes = [tuple(hw) for hw in out["image_sizes"].tolist()] if flat else []
            starts = np.cumsum([0] + counts)
            rows = [self._expand(r, sizes[a:b]) for r, a, b in zip(raw, starts[:-1], starts[1:])]
            if truncation and max_length is not None:
                rows = [self._truncate(r, max_length) for r in rows]
            out.update(self._pad(rows, padding, max_length, return_tensors))
        return out


__all__ = ["LlavaNextProcessor"]
