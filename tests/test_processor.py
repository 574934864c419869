"""Our LlavaProcessor against transformers' LlavaProcessor on the same llava-hf folder.

Oracle backend: with torchvision installed, transformers 5.24's AutoProcessor picks the torchvision
`CLIPImageProcessor`, whose antialiased bicubic resize differs from PIL's by 1-2 of 255 levels
on a few pixels (max 0.015-0.029 after normalisation, mean ~1e-4, on random-noise images at
500x375 .. 100x700; 0 at 336x336, where nothing is resized). The original LLaVA and we use PIL, so
the oracle asks for the PIL `CLIPImageProcessorPil` with `backend="pil"`.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from llava_core.model.config import ConfigError
from llava_core.model.processor import VICUNA_V1_SYSTEM, LlavaProcessor, ProcessorError
from llava_core.testing import CLIP_MEAN, CLIP_STD, make_tiny_checkpoint, reference_processor

PIXEL_TOL = 1e-6
SIZES = [(336, 336), (500, 375), (375, 500), (100, 700), (1024, 768), (37, 51)]  # (width, height)


@pytest.fixture(scope="module")
def hf_proc(tiny_ckpt):
    return reference_processor(tiny_ckpt)


@pytest.fixture(scope="module")
def full_ckpt(tmp_path_factory):
    # image_seq_length: transformers writes its default 576 whatever the strategy; config.py checks it.
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_full"), vision_feature_select_strategy="full",
                                image_seq_length=577)


def noise_image(w, h, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    a = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(a[..., 0] if channels == 1 else a, mode)


def hf_pixels(hf_proc, image):
    return hf_proc.image_processor(image, return_tensors="pt")["pixel_values"]


def max_diff(a, b):
    return (a - b).abs().max().item()


# --- images ------------------------------------------------------------------------

@pytest.mark.parametrize("wh", SIZES)
def test_pixels_match_transformers(processor, hf_proc, wh):
    image = noise_image(*wh)
    px = processor.preprocess(image)
    assert px.shape == (1, 3, 336, 336) and px.dtype == torch.float32
    assert max_diff(px, hf_pixels(hf_proc, image)) <= PIXEL_TOL


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_grayscale_and_rgba_match_transformers(processor, hf_proc, mode):
    image = noise_image(400, 300, mode, seed=1)  # RGBA: random alpha, composited onto white
    assert max_diff(processor.preprocess(image), hf_pixels(hf_proc, image)) <= PIXEL_TOL


def test_paths_and_arrays_read_like_pil(processor, tmp_path):
    image = noise_image(500, 375, seed=2)
    image.save(tmp_path / "img.png")
    a = np.asarray(image)
    px = processor.preprocess([image, tmp_path / "img.png", str(tmp_path / "img.png"), a, a / 255.0])
    assert px.shape == (5, 3, 336, 336)
    assert all(torch.equal(px[0], px[i]) for i in range(1, 5))


def test_bad_image_inputs_name_the_path(processor, tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        processor.preprocess(missing)
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    with pytest.raises(ProcessorError, match="notes.txt"):
        processor.preprocess(str(notes))
    with pytest.raises(ProcessorError, match=r"\(3, 4, 5, 6\)"):
        processor.preprocess(np.zeros((3, 4, 5, 6), np.uint8))


def expand2square(image, fill):
    # LLaVA's llava/mm_utils.py, written out as the reference for pad mode.
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return canvas


@pytest.mark.parametrize("wh", [(200, 100), (100, 300)])
def test_pad_mode_is_a_mean_colour_square(processor, hf_proc, wh):
    image = Image.new("RGB", wh, (255, 0, 0))
    px = processor.preprocess(image, mode="pad")  # (1, 3, 336, 336)
    fill = tuple(int(m * 255) for m in CLIP_MEAN)  # (122, 116, 104)
    border = (torch.tensor(fill) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)  # (3,)
    red = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert max_diff(px[0, :, 0, 0], border) <= PIXEL_TOL
    assert max_diff(px[0, :, 335, 335], border) <= PIXEL_TOL
    assert max_diff(px[0, :, 168, 168], red) <= PIXEL_TOL
    assert max_diff(px, hf_pixels(hf_proc, expand2square(image, fill))) <= PIXEL_TOL
    # crop mode on the same image sees no mean colour at all
    assert max_diff(processor.preprocess(image)[0, :, 0, 0], red) <= PIXEL_TOL


# --- text --------------------------------------------------------------------------

def test_chat_template_matches_transformers(processor, hf_proc):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    prompt = processor.apply_chat_template(messages)
    assert prompt == "USER: <image>\nWhat is this? ASSISTANT:"
    assert prompt == hf_proc.apply_chat_template(messages, add_generation_prompt=True)
    assert processor.prompt("What is this?") == prompt


def test_llava15_fallback_renders_like_the_hub_template(processor, tiny_ckpt):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]},
        {"role": "user", "content": "And the colour?"},
    ]
    fallback = LlavaProcessor.from_pretrained(tiny_ckpt, template="llava15")
    for gen in (True, False):
        assert fallback.apply_chat_template(messages, gen) == processor.apply_chat_template(messages, gen)
    assert fallback.apply_chat_template(messages) == (
        "USER: <image>\nWhat is this? ASSISTANT: A red circle. USER: And the colour? ASSISTANT:")


def test_vicuna_v1_template_text(tiny_ckpt):
    proc = LlavaProcessor.from_pretrained(tiny_ckpt, template="vicuna_v1")
    system = ("A chat between a curious human and an artificial intelligence assistant. "
              "The assistant gives helpful, detailed, and polite answers to the human's questions.")
    assert VICUNA_V1_SYSTEM == system
    assert proc.prompt("What is this?") == system + " USER: <image>\nWhat is this? ASSISTANT:"
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A red circle."},
        {"role": "user", "content": "And the colour?"},
    ]
    assert proc.apply_chat_template(messages) == (
        system + " USER: <image>\nWhat is this? ASSISTANT: A red circle.</s>USER: And the colour? ASSISTANT:")


def test_fallback_template_when_checkpoint_has_none(tiny_ckpt, tmp_path):
    folder = tmp_path / "no_template"
    shutil.copytree(tiny_ckpt, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    for name in ("chat_template.json", "chat_template.jinja"):
        (folder / name).unlink(missing_ok=True)
    assert "chat_template" not in json.loads((folder / "tokenizer_config.json").read_text())
    proc = LlavaProcessor.from_pretrained(folder)
    assert proc.chat_template is None and proc.template == "llava15"
    assert proc.prompt("What is this?") == "USER: <image>\nWhat is this? ASSISTANT:"
    with pytest.raises(ConfigError, match="no chat template"):
        LlavaProcessor.from_pretrained(folder, template="checkpoint")


def test_single_prompt_ids_match_transformers(processor, hf_proc):
    image = noise_image(500, 375)
    prompt = processor.prompt("What is this?")
    out = processor(text=prompt, images=image)
    ref = hf_proc(text=prompt, images=image, return_tensors="pt")
    assert out["input_ids"].dtype == torch.long and out["input_ids"].shape == ref["input_ids"].shape
    assert torch.equal(out["input_ids"], ref["input_ids"])
    assert torch.equal(out["attention_mask"], ref["attention_mask"])
    assert max_diff(out["pixel_values"], ref["pixel_values"]) <= PIXEL_TOL
    assert (out["input_ids"] == processor.cfg.image_token_index).sum() == 576


def test_batch_left_padding_and_two_images_match_transformers(processor, hf_proc):
    images = [noise_image(*wh, seed=i) for i, wh in enumerate([(500, 375), (375, 500), (100, 700)])]
    texts = [processor.prompt("Compare the two pictures, please.", n_images=2),
             processor.prompt("What is this?"),
             "USER: Say hello without any picture at all, in a long sentence. ASSISTANT:"]
    out = processor(text=texts, images=images)
    ref = hf_proc(text=texts, images=images, return_tensors="pt", padding=True)
    assert torch.equal(out["input_ids"], ref["input_ids"])
    assert torch.equal(out["attention_mask"], ref["attention_mask"])
    assert out["pixel_values"].shape == (3, 3, 336, 336)
    assert max_diff(out["pixel_values"], ref["pixel_values"]) <= PIXEL_TOL

    ids, mask = out["input_ids"], out["attention_mask"]
    n_image = (ids == processor.cfg.image_token_index).sum(1)
    assert n_image.tolist() == [1152, 576, 0]
    lengths = [len(processor.tokenize(t)) for t in texts]
    assert mask.sum(1).tolist() == lengths and ids.shape[1] == max(lengths)
    for row, n in enumerate(lengths):  # left padding: pads then the prompt, starting with BOS
        pad = ids.shape[1] - n
        assert (ids[row, :pad] == processor.pad_token_id).all() and (mask[row, :pad] == 0).all()
        assert ids[row, pad] == processor.tokenizer.bos_token_id and (mask[row, pad:] == 1).all()
    # images may also be given one list per prompt
    nested = processor(text=texts, images=[images[:2], images[2:], []])
    assert torch.equal(nested["input_ids"], ids) and torch.equal(nested["pixel_values"], out["pixel_values"])


def test_image_token_counts_default_and_full(processor, full_ckpt):
    from transformers import AutoProcessor
    assert processor.cfg.num_image_tokens == 576
    full = LlavaProcessor.from_pretrained(full_ckpt)
    assert full.cfg.num_image_tokens == 577
    image = noise_image(336, 336)
    out = full(text=full.prompt("What is this?"), images=image)
    assert (out["input_ids"] == full.cfg.image_token_index).sum() == 577
    ref = AutoProcessor.from_pretrained(full_ckpt, backend="pil")(
        text=full.prompt("What is this?"), images=image, return_tensors="pt")
    assert torch.equal(out["input_ids"], ref["input_ids"])


def test_processor_config_disagreement_names_both_counts(tiny_ckpt, tmp_path):
    folder = tmp_path / "bad_proc"
    shutil.copytree(tiny_ckpt, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    path = folder / "processor_config.json"
    d = json.loads(path.read_text())
    d["num_additional_image_tokens"] = 0  # transformers would then emit 575
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=r"575.*576"):
        LlavaProcessor.from_pretrained(folder)


def test_placeholder_image_count_mismatch(processor):
    image = noise_image(336, 336)
    with pytest.raises(ProcessorError, match=r"1 <image> placeholders.*2 images"):
        processor(text=processor.prompt("What is this?"), images=[image, image])
    with pytest.raises(ProcessorError, match=r"2 <image> placeholders.*1 images"):
        processor(text=processor.prompt("What is this?", n_images=2), images=image)
    with pytest.raises(ProcessorError, match=r"0 <image> placeholders"):
        processor(text="USER: hi ASSISTANT:", images=image)
    with pytest.raises(ProcessorError, match=r"\[1, 0\] per prompt.*\[0, 1\]"):
        processor(text=[processor.prompt("a"), "USER: b ASSISTANT:"], images=[[], [image]])


def test_truncation_never_cuts_image_tokens(processor):
    image = noise_image(336, 336)
    prompt = processor.prompt("What is this?")
    n = len(processor.tokenize(prompt))
    out = processor(text=prompt, images=image, truncation=True, max_length=n - 3)  # cuts text only
    assert out["input_ids"].shape == (1, n - 3)
    assert (out["input_ids"] == processor.cfg.image_token_index).sum() == 576
    with pytest.raises(ProcessorError, match="would cut image tokens"):
        processor(text=prompt, images=image, truncation=True, max_length=100)


def test_decode_passes_through(processor):
    ids = processor.tokenize("USER: hello ASSISTANT:")
    assert processor.decode(ids, skip_special_tokens=True) == processor.tokenizer.decode(ids, skip_special_tokens=True)
    assert processor.batch_decode([ids, ids[:3]]) == processor.tokenizer.batch_decode([ids, ids[:3]])
    assert "hello" in processor.decode(ids)


def test_missing_preprocessor_config_uses_clip_defaults_and_tower_size(processor, tiny_ckpt, tmp_path):
    folder = tmp_path / "no_preproc"
    shutil.copytree(tiny_ckpt, folder, ignore=shutil.ignore_patterns("*.safetensors", "preprocessor_config.json"))
    bare = LlavaProcessor.from_pretrained(folder)
    assert bare.image_cfg == processor.image_cfg  # 336 from vision_config.image_size, CLIP mean/std, bicubic
    image = noise_image(500, 375)
    assert torch.equal(bare.preprocess(image), processor.preprocess(image))


def test_preprocessor_config_that_misfits_the_tower_is_an_error(tiny_ckpt, tmp_path):
    folder = tmp_path / "bad_crop"
    shutil.copytree(tiny_ckpt, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    path = folder / "preprocessor_config.json"
    d = json.loads(path.read_text())
    d["crop_size"] = {"height": 224, "width": 224}
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=r"preprocessor_config.json.*\(224, 224\).*336x336"):
        LlavaProcessor.from_pretrained(folder)
