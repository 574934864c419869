"""Generation: prefill once, then one token per step through the KV cache.

The loop follows gpt-fast's split: `prefill` runs the whole prompt (images already
merged into the embeddings) and `decode_one` a single new token per row; samplers are
pure functions of the logits. Batches are left-padded; the cache tracks which slots are
padding and each row's rotary position, so every row decodes as if it were alone.
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass, field, replace
from typing import Iterator

import torch

from ..model.kv_cache import ContextOverflowError, KVCache
from ..model.llava import LlavaModel

log = logging.getLogger(__name__)


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off (as in transformers: divide positive logits, multiply negative)
    seed: int | None = None
    stop_strings: list[str] = field(default_factory=list)

    def __post_init__(self):
        for name in ("max_new_tokens", "top_k"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), numbers.Integral):
                raise ValueError(f"{name}={getattr(self, name)!r}: must be an integer")
        for name in ("temperature", "top_p", "repetition_penalty"):
            if not isinstance(getattr(self, name), numbers.Real) or not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)!r}: must be a finite number")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty}: must be > 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


# --- samplers: pure functions of the logits ------------------------------------------

def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    # logits (B, V); seen (B, V) bool: tokens already in the row's prompt or output
    if penalty == 1.0:
        return logits
    scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, scaled, logits)


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches p (always at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop = cum - sorted_logits.softmax(-1) >= p  # mass before this token already reaches p
    drop[..., 0] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def sample(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None,
           generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> next tokens (B,)."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(-1)
    logits = filter_top_p(filter_top_k(logits / params.temperature, params.top_k), params.top_p)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# --- model steps ----------------------------------------------------------------------

def prefill(model: LlavaModel, input_ids: torch.Tensor, cache: KVCache, pixel_values=None,
            attention_mask=None, image_features=None, image_sizes=None) -> torch.Tensor:
    """Run the prompt through the decoder into the cache -> last-position logits (B, V).
    image_sizes (N, 2): llava_next only, each image's (height, width) from its processor."""
    sizes = {} if image_sizes is None else {"image_sizes": image_sizes}
    embeds = model.embed(input_ids, pixel_values, image_features, **sizes)  # (B, T, C)
    hidden = model.language_model(embeds, attention_mask=attention_mask, cache=cache)  # (B, T, C)
    return model.logits(hidden[:, -1])  # (B, V)


def decode_one(model: LlavaModel, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """tokens (B,) -> logits (B, V) for the next position."""
    embeds = model.language_model.embed_tokens(tokens[:, None])  # (B, 1, C)
    hidden = model.language_model(embeds, cache=cache)  # (B, 1, C)
    return model.logits(hidden[:, -1])


def seen_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, vocab: int) -> torch.Tensor:
    """(B, V) bool: the tokens each row's prompt holds, for the repetition penalty."""
    real = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, 0)
    seen = torch.zeros(input_ids.shape[0], vocab, dtype=torch.bool, device=input_ids.device)
    return seen.scatter_(1, real.clamp(0, vocab - 1), True)


@torch.inference_mode()
def decode_loop(model: LlavaModel, logits: torch.Tensor, cache: KVCache, params: SamplingParams,
                eos_token_ids: list[int], seen: torch.Tensor | None = None,
                pad_token_id: int = 0, cuda_graph: bool = True) -> Iterator[torch.Tensor]:
    """From the prompt's last logits (B, V), yield each step's tokens (B,) until every row has
    produced an EOS id or max_new_tokens. Finished rows yield pad_token_id. The last token
    yielded is not fed back, so the cache ends one token short of the output.
    On CUDA the step is replayed as a CUDA graph (cuda_graph.py) unless cuda_graph=False."""
    step_fn = decode_one
    if cuda_graph and cache.k.is_cuda and params.max_new_tokens > 2:
        from .cuda_graph import GraphedStep
        step_fn = GraphedStep(model, cache)
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=logits.device).manual_seed(params.seed)
    if params.repetition_penalty == 1.0:
        seen = None
    eos = torch.tensor(eos_token_ids or [-1], device=logits.device)
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    for step in range(params.max_new_tokens):
        tokens = sample(logits, params, seen, generator).masked_fill(done, pad_token_id)  # (B,)
        yield tokens
        done |= torch.isin(tokens, eos)
        if bool(done.all()) or step == params.max_new_tokens - 1:
            return
        if seen is not None:
            seen.scatter_(1, tokens[:, None], True)
        logits = step_fn(model, tokens, cache)


@torch.inference_mode()
def generate_tokens(model: LlavaModel, input_ids: torch.Tensor, params: SamplingParams,
                    eos_token_ids: list[int], pixel_values=None, attention_mask=None,
                    pad_token_id: int = 0, cuda_graph: bool = True, image_sizes=None) -> Iterator[torch.Tensor]:
    """Prefill a (left-padded) batch of prompts, then yield each step's tokens (B,).
    image_sizes: llava_next's (N, 2), as its processor returns it."""
    B, T = input_ids.shape
    params = fit_context(T, params, model.cfg.text.max_position_embeddings)
    cache = model.new_cache(B, T + params.max_new_tokens)
    seen = None
    if params.repetition_penalty != 1.0:
        seen = seen_tokens(input_ids, attention_mask, model.cfg.text.vocab_size)
    logits = prefill(model, input_ids, cache, pixel_values, attention_mask, image_sizes=image_sizes)
    yield from decode_loop(model, logits, cache, params, eos_token_ids, seen, pad_token_id, cuda_graph)


def fit_context(n_prompt: int, params: SamplingParams, context: int) -> SamplingParams:
    """Refuse a prompt that leaves no room for one new token in the model's context; cap
    max_new_tokens to the room left (with a warning), so the cache never outgrows the context."""
    if n_prompt + 1 > context:
        raise ContextOverflowError(
            f"the prompt is {n_prompt} tokens (image tokens included) but the model's context is {context}: "
            f"at most {context - 1} leave room for an answer; shorten the text or use fewer images")
    room = context - n_prompt
    if params.max_new_tokens > room:
        log.warning("max_new_tokens=%d capped to %d: the prompt's %d tokens and the answer fill the "
                    "model's context of %d; the answer stops there", params.max_new_tokens, room, n_prompt, context)
        params = replace(params, max_new_tokens=room)
    return params


def find_stop(text: str, stop_strings: list[str]) -> int:
    """Index where the earliest stop string begins in text, or -1."""
    hits = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return min(hits) if hits else -1


def _held_back(text: str, stop_strings: list[str]) -> int:
    """How many trailing characters could still grow into a stop string."""
    longest = 0
    for s in stop_strings:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if s.startswith(text[-n:]):
                longest = n
                break
    return longest


class TextStream:
    """Turns one row's token ids into text pieces that are final: the concatenation of the
    pieces always equals the decoded text, multi-byte characters are never split (decoding
    the whole answer each time keeps sentencepiece's spaces right), and text that might
    still become a stop string is held back until it cannot."""

    def __init__(self, tokenizer, stop_strings: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop_strings = list(stop_strings or [])
        self.ids: list[int] = []
        self.emitted = 0
        self.stopped = False

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token: int) -> str:
        """Add a token; return the newly final text (maybe empty). Sets `stopped` on a stop string."""
        self.ids.append(token)
        text = self.text()
        cut = find_stop(text, self.stop_strings)
        if cut >= 0:
            self.stopped = True
            return self._emit(text[:cut])
        if text.endswith("\ufffd"):  # an incomplete multi-byte character
            return ""
        return self._emit(text[:len(text) - _held_back(text, self.stop_strings)])

    def follow(self, steps) -> Iterator[str]:
        """Yield the non-empty text pieces of row 0 of a token-step iterator ((B,) per step),
        stopping at a stop string, then the rest once the steps end."""
        for tokens in steps:
            piece = self.push(int(tokens[0]))
            if piece:
                yield piece
            if self.stopped:
                return
        rest = self.finish()
        if rest:
            yield rest

    def finish(self) -> str:
        """The rest of the text once generation has ended."""
        if self.stopped:
            return ""
        text = self.text()
        cut = find_stop(text, self.stop_strings)
        return self._emit(text if cut < 0 else text[:cut])

    def _emit(self, final: str) -> str:
        piece = final[self.emitted:]
        self.emitted = max(self.emitted, len(final))
        return piece
