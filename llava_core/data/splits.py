"""Splits: per-sample random streams and the partition of scene space.

Sample i of a split has its own RNG seeded from a hash of (seed, split, i), so it is
reproducible without generating samples 0..i-1. Which of train/validation/test a scene
may appear in is a pure function of its layout key (the discrete content that fixes
the picture: objects, cells, sizes; text and colour; document rows), so no layout,
and hence no image, is ever shared between those three splits. `shifted` re-renders
test-bucket layouts; `heldout` draws only layouts holding a held-out (colour, shape)
pair, which the other splits never draw.
"""

from __future__ import annotations

import hashlib
import random

SPLITS = ("train", "validation", "test", "heldout", "shifted")
BUCKETED = ("train", "validation", "test")
_BUCKETS = 10_000


def keyed_rng(key: str) -> random.Random:
    """An RNG that depends on `key` only (not on Python's hash seed)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def sample_rng(seed: int, split: str, index: int) -> random.Random:
    """The RNG of sample `index` of `split`."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return keyed_rng(f"{seed}:{split}:{index}")


def bucket_of(key: str, fractions: tuple[float, float, float]) -> str:
    """The split among train/validation/test that owns a layout key (independent of seed)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "little") % _BUCKETS / _BUCKETS
    if u < fractions[0]:
        return "train"
    return "validation" if u < fractions[0] + fractions[1] else "test"


def owner_split(split: str) -> str | None:
    """The bucket a split's layouts must fall in: itself, `test` for shifted, none for heldout."""
    if split == "shifted":
        return "test"
    return split if split in BUCKETED else None
