"""Multi-turn image chat that keeps the KV cache between turns.

Each turn renders the whole conversation with the chat template and tokenises it, then
compares the ids with those already in the cache: only the part after their longest
common prefix is prefilled. An image is encoded once, when it first appears; its
projected features are kept, so a later turn (or a rollback that cuts into the tokens
after it) never runs the vision tower again. `undo()` and `regenerate()` only edit the
conversation: the next prefill rolls the cache back to where it still agrees.
LLaVA-NeXT models work the same way; there each image's token count follows its size.
"""

from __future__ import annotations

from typing import Iterator

import torch

from ..model.kv_cache import ContextOverflowError
from ..model.llava import LlavaModel
from ..model.next_config import LlavaNextConfig
from ..model.processor import load_image
from ..model.text_guard import check_messages
from .decode import SamplingParams, TextStream, decode_loop, seen_tokens


class ChatSession:
    def __init__(self, model: LlavaModel, processor, images=None, max_context: int | None = None):
        self.model, self.processor = model, processor
        self.next = isinstance(model.cfg, LlavaNextConfig)  # llava_next: tokens per image follow its size
        limit = model.cfg.text.max_position_embeddings
        if max_context is not None and not 1 < max_context <= limit:
            raise ValueError(f"max_context={max_context}: must be in 2..{limit}, the model's context")
        self.max_context = max_context or limit
        self.cache = model.new_cache(1, self.max_context)
        self.cached_ids: list[int] = []  # the token ids whose keys/values the cache holds
        self.messages: list[dict] = []  # transformers-style chat messages
        self.images: list = []  # every image of the conversation, in order
        self.features: list[torch.Tensor] = []  # (M, C) projected features, one per encoded image
        self.pending: list = []  # images waiting for the next user turn
        for image in [images] if images is not None and not isinstance(images, (list, tuple)) else images or []:
            self.add_image(image)

    # --- conversation ---------------------------------------------------------------

    def add_image(self, image) -> None:
        """Attach an image (path, PIL image or array) to the next user turn."""
        self.pending.append(load_image(image))

    def ask(self, text: str, image=None, **sampling) -> str:
        return "".join(self.stream(text, image, **sampling))

    def stream(self, text: str, image=None, **sampling) -> Iterator[str]:
        """Add a user turn and yield the answer's text pieces as they become final."""
        if not text or not text.strip():
            raise ValueError("empty message: a chat turn needs some text")
        if image is not None:
            self.add_image(image)
        content = [{"type": "image"} for _ in self.pending] + [{"type": "text", "text": text}]
        check_messages([{"role": "user", "content": content}], getattr(self.processor, "special_strings", ()))
        self.messages.append({"role": "user", "content": content})
        self.images += self.pending
        self.pending = []
        yield from self._answer(SamplingParams(**sampling))

    def regenerate(self, **sampling) -> str:
        """Drop the last answer and generate it again (the cache rolls back to the prompt)."""
        if not self.messages or self.messages[-1]["role"] != "assistant":
            raise ValueError("nothing to regenerate: the conversation has no answer yet")
        self.messages.pop()
        return "".join(self._answer(SamplingParams(**sampling)))

    def undo(self) -> None:
        """Remove the last question and its answer (and any image that came with it)."""
        if not self.messages:
            raise ValueError("nothing to undo: the conversation is empty")
        if self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        user = self.messages.pop()
        n = sum(1 for item in user["content"] if item["type"] == "image")
        if n:
            del self.images[-n:]
            del self.features[len(self.images):]
            self._forget_from_image(len(self.images))

    def _forget_from_image(self, n: int) -> None:
        """Drop cached ids from the first token of image n on: another image may take its place,
        and the ids alone (all the same image token) would not show the change."""
        start = _image_start(self.cached_ids, n, self._image_counts(), self.model.cfg.image_token_index)
        self.cached_ids = self.cached_ids[:start]

    def _sizes(self) -> list[tuple[int, int]]:
        return [(im.height, im.width) for im in self.images]

    def _image_counts(self) -> list[int]:
        """Image tokens per image of the conversation (llava_next: from each image's size)."""
        cfg = self.model.cfg
        if self.next:
            return [cfg.image_tokens(hw) for hw in self._sizes()]
        return [cfg.num_image_tokens] * len(self.images)

    def reset(self) -> None:
        """Forget the conversation, its images and the cache."""
        self.messages, self.images, self.features, self.pending = [], [], [], []
        self.cached_ids = []
        self.cache.truncate(0)

    def history(self) -> list[dict]:
        """The conversation as plain data: [{"role", "text", "images"}]."""
        return [{"role": m["role"],
                 "text": " ".join(i["text"] for i in m["content"] if i["type"] == "text"),
                 "images": sum(1 for i in m["content"] if i["type"] == "image")} for m in self.messages]

    @property
    def tokens_used(self) -> int:
        return self.cache.length

    # --- the cache ------------------------------------------------------------------

    def prompt_ids(self) -> list[int]:
        """Token ids of the whole conversation so far, ending with the assistant's prompt."""
        text = self.processor.apply_chat_template(self.messages)
        if self.next:
            return self.processor.tokenize(text, image_sizes=self._sizes())
        return self.processor.tokenize(text)

    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> torch.Tensor:
        """Bring the cache to hold `ids`, prefilling only what it lacks -> last logits (1, V)."""
        model, image_id = self.model, self.model.cfg.image_token_index
        keep = 0
        limit = min(len(self.cached_ids), len(ids) - 1)  # the last prompt token is always run
        while keep < limit and self.cached_ids[keep] == ids[keep]:
            keep += 1
        if ids[keep] == image_id:  # never split an image's block of tokens: start at its first
            counts = self._image_counts()
            seen, whole = ids[:keep].count(image_id), 0  # image tokens before keep; images complete there
            while whole < len(counts) and sum(counts[:whole + 1]) <= seen:
                whole += 1
            keep = min(keep, _image_start(ids, whole, counts, image_id))
        self.cache.truncate(keep)
        new = torch.tensor([ids[keep:]], device=model.device)  # (1, T)
        n_image_tokens = int((new == image_id).sum())
        feats = None
        if n_image_tokens:
            self._encode_images()
            feats = torch.cat(self.features)[-n_image_tokens:]  # (k, C): the last k rows
            feats = [feats] if self.next else feats[None]  # llava_next: a list per image; else (1, k, C)
        embeds = model.embed(new, image_features=feats)
        hidden = model.language_model(embeds, cache=self.cache)
        self.cached_ids = list(ids)
        return model.logits(hidden[:, -1])

    def _encode_images(self) -> None:
        todo = self.images[len(self.features):]
        if todo and self.next:
            px, sizes = self.processor.preprocess(todo)  # (N, P, 3, S, S), (N, 2)
            self.features += self.model.image_features(px.to(self.model.device), sizes)  # N x (M_i, C)
        elif todo:
            px = self.processor.preprocess(todo).to(self.model.device)  # (N, 3, H, W)
            self.features += list(self.model.image_features(px))  # N x (M, C)

    def _answer(self, params: SamplingParams) -> Iterator[str]:
        ids = self.prompt_ids()
        need = len(ids) + params.max_new_tokens
        if need > self.max_context:
            self.messages.pop()  # the turn that does not fit
            raise ContextOverflowError(
                f"context overflow: the conversation uses {len(ids)} tokens and the answer may take "
                f"{params.max_new_tokens} more ({need}), but {self.max_context} are allowed; "
                "reset() or undo() to make room")
        logits = self.prefill(ids)
        tok = self.processor.tokenizer
        text_cfg = self.model.cfg.text
        seen = None
        if params.repetition_penalty != 1.0:
            seen = seen_tokens(torch.tensor([ids]), None, text_cfg.vocab_size).to(logits.device)
        stream = TextStream(tok, params.stop_strings)
        pieces: list[str] = []
        for piece in stream.follow(decode_loop(self.model, logits, self.cache, params, text_cfg.eos_token_ids,
                                               seen)):
            pieces.append(piece)
            yield piece
        self.cached_ids = (ids + stream.ids)[:self.cache.length]
        answer = "".join(pieces).strip()
        self.messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})


def _image_start(ids: list[int], n: int, counts: list[int], image_id: int) -> int:
    """Index of the first token of image n (0-based) in ids, image k having counts[k] tokens;
    len(ids) if there is no such image."""
    before, seen = sum(counts[:n]), 0  # n may be len(counts): the first image past those counted
    for i, t in enumerate(ids):
        if t == image_id:
            if seen == before:
                return i
            seen += 1
    return len(ids)
