"""Property: whatever image (size 1..2000 px a side, any of ten PIL modes) and whatever text
(random unicode, special-token strings mixed in) a user hands over, the processor and the tiny
model raise nothing but the documented errors (docs/robustness.md): ProcessorError and
ContextOverflowError, both ValueErrors. Anything else (a TypeError from the tokenizer, a
RuntimeError from sampling, a Pillow error) is a bug this test finds."""

import numpy as np
import pytest
import torch
from PIL import Image

from llava_core.checkpoints.loader import load_pretrained
from llava_core.model.kv_cache import ContextOverflowError
from llava_core.model.processor import LlavaProcessor, ProcessorError
from llava_core.runtime.generate import generate

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st  # noqa: E402

DOCUMENTED = (ProcessorError, ContextOverflowError)
MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"]
SPECIALS = ["<image>", "</s>", "<s>", "<pad>", "<unk>", "<|im_end|>", "<|im_start|>"]


@pytest.fixture(scope="module")
def setup(tiny_ckpt):
    return load_pretrained(tiny_ckpt), LlavaProcessor.from_pretrained(tiny_ckpt)


def make_image(mode: str, w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "F":
        return Image.fromarray(rng.normal(0.5, 1.0, (h, w)).astype(np.float32), "F")
    if mode in ("I;16", "I"):
        a = rng.integers(0, 65536, (h, w)).astype(np.uint16 if mode == "I;16" else np.int32)
        return Image.fromarray(a, mode) if mode == "I" else Image.fromarray(a)
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    im = rgb.convert(mode)
    if mode == "P" and seed % 2:
        im.info["transparency"] = int(seed % 256)
    return im


text = st.lists(st.one_of(st.text(max_size=40), st.sampled_from(SPECIALS + ["\udcff"])), max_size=4).map("".join)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(mode=st.sampled_from(MODES), w=st.integers(1, 2000), h=st.integers(1, 2000),
       seed=st.integers(0, 2**16), question=text)
def test_processor_raises_only_documented_errors(setup, mode, w, h, seed, question):
    model, processor = setup
    px = processor.preprocess(make_image(mode, w, h, seed))
    assert px.shape == (1, 3, 336, 336) and torch.isfinite(px).all()
    try:
        prompt = processor.prompt(question, 1)
    except DOCUMENTED:
        assert any(s in question for s in processor.special_strings) or _not_utf8(question)
        return
    assert not any(s in question for s in processor.special_strings)
    enc = processor(text=prompt, images=[np.zeros((4, 4, 3), np.uint8)])
    assert int((enc["input_ids"] == processor.image_token_id).sum()) == model.cfg.num_image_tokens


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(mode=st.sampled_from(MODES), side=st.integers(1, 64), question=text,
       temperature=st.sampled_from([0.0, 0.7]))
def test_model_answers_or_raises_documented_errors(setup, mode, side, question, temperature):
    model, processor = setup
    try:
        answer = generate(model, processor, question, make_image(mode, side, side + 1, side),
                          max_new_tokens=2, temperature=temperature, seed=0)
    except DOCUMENTED:
        return
    except ValueError as e:  # the documented empty-prompt refusal
        assert "empty prompt" in str(e) and not question.strip()
        return
    assert isinstance(answer, str)


def _not_utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True
