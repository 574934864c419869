"""Synthetic vision-assistant data: shape scenes, OCR words and small documents, with
questions, captions and multi-turn conversations; seeded per (split, index).

    from llava_core.data import DataConfig, make_sample, SyntheticDataset
    sample = make_sample("train", 0)          # {"image", "conversation", "qtype", "answer", "meta"}
    ds = SyntheticDataset("validation", 1000, DataConfig(mix="caption"))
"""

from .dataset import (CAPTION_MIX, CONTRASTIVE_MIX, INSTRUCT_MIX, MIXES, NATURAL_MIX, QTYPES, DataConfig,
                      SyntheticDataset, caption_pairs, make_sample)
from .grid import save_grid
from .scene import SceneConfig
from .shift import ShiftConfig
from .splits import SPLITS
from .vocab import COLOURS, HELDOUT_PAIRS, SHAPES

__all__ = [
    "DataConfig", "SceneConfig", "ShiftConfig", "make_sample", "SyntheticDataset", "caption_pairs",
    "save_grid", "QTYPES", "SPLITS", "MIXES", "CAPTION_MIX", "INSTRUCT_MIX", "NATURAL_MIX", "CONTRASTIVE_MIX",
    "COLOURS", "SHAPES", "HELDOUT_PAIRS",
]
