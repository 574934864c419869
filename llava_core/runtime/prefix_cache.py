"""Keys and values of a few finished sequences, so a prompt that begins the same way (the next
turn of a chat, a second question about the same image) prefills only what is new.

An entry is (token ids, image digests, keys, values). A lookup takes the longest common prefix of
the ids, then shortens it so it never ends inside an image's block of tokens and never covers an
image whose digest differs (the ids of two different images are the same image-token ids, so
the ids alone cannot tell them apart). Keys are causal: a slot's key depends only on the tokens
before it, so a shared prefix computed for one prompt is the same prefix for another.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class PrefixCache:
    def __init__(self, entries: int, image_token_id: int, tokens_per_image: int, min_reuse: int = 8):
        self.entries = entries
        self.image_token_id = image_token_id
        self.tokens_per_image = tokens_per_image
        self.min_reuse = min_reuse  # shorter matches (a BOS and a role word) are not worth a copy
        self._store: OrderedDict[int, tuple[list[int], tuple[str, ...], torch.Tensor, torch.Tensor]] = OrderedDict()
        self._next = 0
        self.hits = 0

    def __len__(self) -> int:
        return len(self._store)

    def add(self, ids: list[int], image_keys: tuple[str, ...], k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: (layers, kv_heads, len(ids), head_dim), the keys/values of exactly these ids."""
        if self.entries <= 0 or len(ids) < self.min_reuse:
            return
        if k.shape[2] != len(ids):
            raise ValueError(f"prefix cache: {len(ids)} ids but keys for {k.shape[2]} slots")
        self._store[self._next] = (list(ids), tuple(image_keys), k, v)
        self._next += 1
        while len(self._store) > self.entries:
            self._store.popitem(last=False)  # the oldest

    def lookup(self, ids: list[int], image_keys: tuple[str, ...]) -> tuple[int, torch.Tensor, torch.Tensor] | None:
        """(n, k, v) for the longest reusable prefix of ids (n <= len(ids) - 1: the last prompt token
        is always run, its logits are the first answer token's), or None."""
        best = None
        for key, (old_ids, old_images, k, v) in self._store.items():
            n = self._reusable(ids, image_keys, old_ids, old_images)
            if n >= self.min_reuse and (best is None or n > best[0]):
                best = (n, key, k, v)
        if best is None:
            return None
        n, key, k, v = best
        self._store.move_to_end(key)  # recently used
        self.hits += 1
        return n, k[:, :, :n], v[:, :, :n]

    def _reusable(self, ids, image_keys, old_ids, old_images) -> int:
        limit = min(len(ids) - 1, len(old_ids))
        n = 0
        while n < limit and ids[n] == old_ids[n]:
            n += 1
        for i, start in enumerate(image_starts(ids, self.image_token_id, self.tokens_per_image)):
            if start >= n:
                break
            end = start + self.tokens_per_image
            same = i < len(image_keys) and i < len(old_images) and image_keys[i] == old_images[i]
            if not same or end > n:  # another image, or the prefix ends inside this one's block
                return start
        return n


def image_starts(ids: list[int], image_token_id: int, tokens_per_image: int) -> list[int]:
    """Index of the first token of each image block in ids."""
    starts, count = [], 0
    for i, t in enumerate(ids):
        if t == image_token_id:
            if count % tokens_per_image == 0:
                starts.append(i)
            count += 1
    return starts
