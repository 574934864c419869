"""Shared fixtures: tiny llava-hf checkpoints written by transformers into temp folders."""

import pytest
import torch

from llava_core.checkpoints.loader import load_pretrained
from llava_core.model.processor import LlavaProcessor
from llava_core.testing import make_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """fp32, transformers-5 layout, single file, GQA decoder (4 heads, 2 KV heads), layer -2, default."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    """Our model on tiny_ckpt, one per test module (tests may hook or quantize it)."""
    return load_pretrained(tiny_ckpt)


@pytest.fixture(scope="module")
def processor(tiny_ckpt):
    return LlavaProcessor.from_pretrained(tiny_ckpt)


@pytest.fixture(scope="session")
def hf_model(tiny_ckpt):
    from transformers import LlavaForConditionalGeneration
    return LlavaForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
