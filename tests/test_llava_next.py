"""LLaVA-NeXT (llava-v1.6) against transformers on tiny random checkpoints it wrote.

Oracle: transformers 5's LlavaNextForConditionalGeneration and LlavaNextProcessor (PIL image
backend, `backend="pil"`, as tests/test_processor.py explains). Tower: 32 px, 8-px patches
(4 x 4 per tile); pinpoints 1x2, 2x1 and 2x2 tiles (testing.NEXT_PINPOINTS).
Tolerances: pixel values, image sizes and ids identical; logits within 1e-4 (fp32); greedy
tokens equal.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from llava_core.checkpoints.loader import CheckpointError, load_pretrained
from llava_core.model.anyres import (fit_within, image_token_count, num_tiles, select_best_resolution, tile_grid,
                                     unpad_box)
from llava_core.model.config import ConfigError
from llava_core.model.llava import ImageTokenMismatch
from llava_core.model.llava_next import LlavaNextModel
from llava_core.model.next_config import LlavaNextConfig, read_config
from llava_core.model.processor_next import LlavaNextProcessor
from llava_core.runtime.decode import SamplingParams, generate_tokens
from llava_core.runtime.generate import generate
from llava_core.testing import MISTRAL_TEMPLATE, make_tiny_next_checkpoint, reference_processor, to_hub_layout

# (height, width): landscape, portrait, square, tiny, one-pixel strips, a large photo-like shape
SIZES = [(40, 90), (90, 40), (50, 50), (7, 5), (1, 64), (64, 1), (33, 64), (200, 31), (480, 640)]
REAL_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llava-v1.6


@pytest.fixture(scope="module")
def next_ckpt(tmp_path_factory):
    return make_tiny_next_checkpoint(tmp_path_factory.mktemp("next"), seed=0)


@pytest.fixture(scope="module")
def ours(next_ckpt):
    return LlavaNextProcessor.from_pretrained(next_ckpt)


@pytest.fixture(scope="module")
def ref_proc(next_ckpt):
    proc = reference_processor(next_ckpt)
    assert type(proc).__name__ == "LlavaNextProcessor"
    return proc


@pytest.fixture(scope="module")
def models(next_ckpt):
    from transformers import LlavaNextForConditionalGeneration
    ref = LlavaNextForConditionalGeneration.from_pretrained(next_ckpt, dtype=torch.float32).eval()
    return load_pretrained(next_ckpt, dtype=torch.float32), ref


def _image(hw, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8))


# --- geometry: our pure functions against transformers' helpers ---------------------------

def test_anyres_geometry_matches_transformers_helpers():
    from transformers.image_processing_utils import get_patch_output_size
    from transformers.image_processing_utils import select_best_resolution as hf_best
    from transformers.image_utils import ChannelDimension
    from transformers.models.llava_next.modeling_llava_next import (get_anyres_image_grid_shape,
                                                                    image_size_to_num_patches, unpad_image)

    rng = np.random.default_rng(0)
    sizes = SIZES + [tuple(int(x) for x in rng.integers(1, 1500, 2)) for _ in range(300)]
    for pins, tile, patch in ((REAL_PINPOINTS, 336, 14), ([[32, 64], [64, 32], [64, 64]], 32, 8),
                              ([[64, 32], [32, 96], [96, 96], [32, 32]], 32, 8)):
        g = tile // patch
        for hw in sizes:
            best = select_best_resolution(hw, pins)
            assert best == tuple(hf_best(hw, pins)), hw
            image = np.zeros((3, *hw), np.uint8)
            assert fit_within(hw, best) == tuple(get_patch_output_size(image, best, ChannelDimension.FIRST)), hw
            assert tile_grid(hw, pins, tile) == tuple(get_anyres_image_grid_shape(list(hw), pins, tile)), hw
            assert num_tiles(hw, pins, tile) == image_size_to_num_patches(list(hw), pins, tile), hw
            rows, cols = tile_grid(hw, pins, tile)
            grid = torch.arange(rows * g * cols * g).view(1, rows * g, cols * g)
            r0, r1, c0, c1 = unpad_box(hw, (rows * g, cols * g))
            assert torch.equal(grid[:, r0:r1, c0:c1], unpad_image(grid, list(hw))), hw


def test_token_counts_match_transformers_processor(ref_proc):
    # the processor's own count (its _get_number_of_features, minus the CLS under "default")
    rng = np.random.default_rng(1)
    for hw in SIZES + [tuple(int(x) for x in rng.integers(1, 400, 2)) for _ in range(200)]:
        want = ref_proc._get_number_of_features(*hw, 32, 32) - 1
        assert image_token_count(hw, [[32, 64], [64, 32], [64, 64]], 32, 8) == want, hw


# --- config ------------------------------------------------------------------------------

def test_config_reads_next_fields(next_ckpt):
    cfg = read_config(next_ckpt)
    assert isinstance(cfg, LlavaNextConfig)
    assert cfg.image_grid_pinpoints == [(32, 64), (64, 32), (64, 64)]
    assert cfg.num_image_tokens == 16  # one tile: 4 x 4 patches, CLS dropped
    # transformers writes image_seq_length=576 for any NeXT config; it is not a cross-check here
    assert json.loads((next_ckpt / "config.json").read_text())["image_seq_length"] == 576


def test_config_refusals(next_ckpt):
    d = json.loads((next_ckpt / "config.json").read_text())
    with pytest.raises(ConfigError, match="vision_feature_select_strategy='full'"):
        LlavaNextConfig.from_hf_dict({**d, "vision_feature_select_strategy": "full"})
    with pytest.raises(ConfigError, match=r"image_grid_pinpoints entry \[32, 48\].*multiple of .*image_size 32"):
        LlavaNextConfig.from_hf_dict({**d, "image_grid_pinpoints": [[32, 64], [32, 48]]})
    with pytest.raises(ConfigError, match="model_type='llava_next', expected 'llava'"):
        from llava_core.model.config import LlavaConfig
        LlavaConfig.from_hf_dict(d)


def test_processor_refuses_pinpoints_that_differ_from_the_model(tmp_path, next_ckpt):
    import shutil
    folder = tmp_path / "ck"
    shutil.copytree(next_ckpt, folder)
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    pre["image_grid_pinpoints"] = [[32, 64]]
    (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    with pytest.raises(ConfigError, match="preprocessor_config.json: image_grid_pinpoints"):
        LlavaNextProcessor.from_pretrained(folder)


# --- processor: identical pixels and ids -------------------------------------------------

@pytest.mark.parametrize("hw", SIZES)
def test_pixels_and_ids_identical_per_size(ours, ref_proc, hw):
    im = _image(hw)
    text = ours.prompt("What is in the image?")
    a = ours(text=text, images=[im])
    b = ref_proc(text=text, images=[im], return_tensors="pt")
    assert torch.equal(a["pixel_values"], b["pixel_values"])
    assert torch.equal(a["image_sizes"], b["image_sizes"])
    assert torch.equal(a["input_ids"], b["input_ids"])
    n = int((a["input_ids"] == ours.image_token_id).sum())
    assert n == ours.cfg.image_tokens(hw)


def test_batch_of_different_sizes_identical(ours, ref_proc):
    # three prompts, four images of different tile counts (3, 5, 3, 3): tile stacks padded to 5
    ims = [_image((40, 90), 1), _image((64, 64), 2), _image((90, 40), 3), _image((7, 5), 4)]
    texts = [ours.prompt("Compare them.", 2), ours.prompt("What is it?"), ours.prompt("And this one?")]
    a = ours(text=texts, images=ims)
    b = ref_proc(text=texts, images=ims, return_tensors="pt", padding=True)
    assert a["pixel_values"].shape == (4, 5, 3, 32, 32)
    assert not a["pixel_values"][0, 3:].any()  # padding tiles are zeros
    for key in ("pixel_values", "image_sizes", "input_ids", "attention_mask"):
        assert torch.equal(a[key], b[key]), key
    # left padding, as our 1.5 path pads
    assert a["attention_mask"][:, -1].all() and not a["attention_mask"].all()


def test_prompt_with_more_placeholders_than_images(ours):
    from llava_core.model.processor import ProcessorError
    with pytest.raises(ProcessorError, match="2 <image> placeholders"):
        ours(text=ours.prompt("two?", 2), images=[_image((40, 40))])


# --- model: logits and generation --------------------------------------------------------

def test_loads_next_model_with_newline(models):
    model, ref = models
    assert isinstance(model, LlavaNextModel)
    assert torch.equal(model.image_newline, ref.model.image_newline)


def test_logits_match_transformers(models, ours):
    model, ref = models
    ims = [_image((40, 90), 5), _image((50, 50), 6)]
    enc = ours(text=[ours.prompt("What is this?"), ours.prompt("Describe the picture.")], images=ims)
    with torch.no_grad():
        a = model(enc["input_ids"], enc["pixel_values"], enc["attention_mask"], image_sizes=enc["image_sizes"])
        b = ref(**enc).logits
    real = enc["attention_mask"].bool()
    assert (a - b)[real].abs().max() <= 1e-4


def test_greedy_generation_matches_transformers(models, ours):
    model, ref = models
    ims = [_image((90, 40), 7), _image((33, 64), 8)]
    enc = ours(text=[ours.prompt("What is this?"), ours.prompt("Read the text.")], images=ims)
    steps = generate_tokens(model, enc["input_ids"], SamplingParams(max_new_tokens=8), [], enc["pixel_values"],
                            enc["attention_mask"], 0, image_sizes=enc["image_sizes"])
    tokens = torch.stack(list(steps), dim=1)  # (B, 8)
    want = ref.generate(**enc, max_new_tokens=8, min_new_tokens=8, do_sample=False)[:, enc["input_ids"].shape[1]:]
    assert torch.equal(tokens, want)


def test_generate_api_runs_next(models, ours):
    # runtime.generate: the processor's image_sizes reach the model through _encode
    model, ref = models
    im = _image((40, 90), 9)
    answer = generate(model, ours, "What is this?", im, max_new_tokens=6)
    enc = ours(text=ours.prompt("What is this?"), images=[im])
    out = ref.generate(**enc, max_new_tokens=6, do_sample=False)[0, enc["input_ids"].shape[1]:]
    assert answer == ours.tokenizer.decode(out, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()


def test_image_token_mismatch_names_counts(models, ours):
    model, _ = models
    enc = ours(text=ours.prompt("What?"), images=[_image((40, 90))])
    other = ours(text=ours.prompt("What?"), images=[_image((50, 50))])  # 5 tiles, more tokens
    with pytest.raises(ImageTokenMismatch, match=r"image tokens .* 1 image\(s\) give"):
        model(enc["input_ids"], other["pixel_values"], image_sizes=other["image_sizes"])
    with pytest.raises(ValueError, match="needs image_sizes"):
        model(enc["input_ids"], enc["pixel_values"])


# --- loader layouts -----------------------------------------------------------------------

def test_hub_and_in_memory_layouts_load_the_same(tmp_path, next_ckpt, models):
    import shutil

    from safetensors.torch import save_file
    model, ref = models
    hub = tmp_path / "hub"
    shutil.copytree(next_ckpt, hub)
    to_hub_layout(hub)  # transformers 4.x hub names: vision_tower.vision_model.*, top-level image_newline
    mem = tmp_path / "mem"
    shutil.copytree(next_ckpt, mem)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(mem / "model.safetensors"))  # model.*
    want = model.state_dict()
    for folder in (hub, mem):
        got = load_pretrained(folder, dtype=torch.float32).state_dict()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), folder.name


def test_missing_newline_is_named(tmp_path, next_ckpt):
    import shutil

    from safetensors.torch import load_file, save_file
    folder = tmp_path / "ck"
    shutil.copytree(next_ckpt, folder)
    sd = load_file(str(folder / "model.safetensors"))
    del sd["image_newline"]
    save_file(sd, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 missing from the checkpoint:\n    image_newline"):
        load_pretrained(folder)


# --- NeXT + Mistral, with a Mistral chat template from the checkpoint --------------------



def test_next_mistral_with_mistral_template(tmp_path):
    from transformers import LlavaNextForConditionalGeneration
    folder = make_tiny_next_checkpoint(tmp_path / "nm", seed=3, chat_template=MISTRAL_TEMPLATE,
                                       text=dict(model_type="mistral", sliding_window=None))
    ours = LlavaNextProcessor.from_pretrained(folder)
    ref_proc = reference_processor(folder)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    text = ours.prompt("What is shown?")
    assert text == "[INST] <image>\nWhat is shown? [/INST]"
    assert text == ref_proc.apply_chat_template(messages, add_generation_prompt=True)
    ims = [_image((40, 90), 11), _image((64, 50), 12)]
    enc = ours(text=[text, ours.prompt("Describe it.")], images=ims)
    ref_enc = ref_proc(text=[text, ours.prompt("Describe it.")], images=ims, return_tensors="pt", padding=True)
    for key in ("pixel_values", "image_sizes", "input_ids", "attention_mask"):
        assert torch.equal(enc[key], ref_enc[key]), key

    model = load_pretrained(folder, dtype=torch.float32)
    assert model.cfg.text.sliding_window is None
    ref = LlavaNextForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    assert type(ref.model.language_model).__name__ == "MistralModel"
    with torch.no_grad():
        a = model(enc["input_ids"], enc["pixel_values"], enc["attention_mask"], image_sizes=enc["image_sizes"])
        b = ref(**enc).logits
    assert (a - b)[enc["attention_mask"].bool()].abs().max() <= 1e-4
    steps = generate_tokens(model, enc["input_ids"], SamplingParams(max_new_tokens=8), [], enc["pixel_values"],
                            enc["attention_mask"], 0, image_sizes=enc["image_sizes"])
    want = ref.generate(**enc, max_new_tokens=8, min_new_tokens=8, do_sample=False)[:, enc["input_ids"].shape[1]:]
    assert torch.equal(torch.stack(list(steps), dim=1), want)


def test_export_round_trip(tmp_path, models, ours):
    # save_llava_hf writes a llava_next folder that we and transformers read back to the same model
    from transformers import LlavaNextForConditionalGeneration

    from llava_core.checkpoints.export import save_llava_hf
    model, _ = models
    folder = save_llava_hf(model, tmp_path / "out")
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llava_next"
    again = load_pretrained(folder, dtype=torch.float32)
    assert isinstance(again, LlavaNextModel)
    want = model.state_dict()
    assert all(torch.equal(t, want[k]) for k, t in again.state_dict().items())
    ref = LlavaNextForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    enc = ours(text=ours.prompt("What is this?"), images=[_image((90, 40), 13)])
    with torch.no_grad():
        a = model(enc["input_ids"], enc["pixel_values"], image_sizes=enc["image_sizes"])
        b = ref(**enc).logits
    assert (a - b).abs().max() <= 1e-4


def _chat_full_logits(model, processor, chat):
    """Last-position logits of one fresh forward over the whole conversation."""
    px, sizes = processor.preprocess(chat.images)
    with torch.no_grad():
        return model(torch.tensor([chat.prompt_ids()]), px, image_sizes=sizes)[:, -1]


def test_chat_session_keeps_the_cache_across_images_of_different_sizes(models, ours):
    """A second image of another shape (another token count) joins in turn 2, through the kept
    cache: the logits equal one forward over the whole conversation (fp32, 1e-4), the first image
    is not encoded again; undoing that turn forgets its image, and a third picture in its place
    again matches a full forward."""
    from llava_core.runtime.chat import ChatSession
    from llava_core.runtime.generate import generate
    model = models[0]
    wide, tall, square = _image((40, 90), 21), _image((90, 40), 22), _image((50, 50), 23)
    assert model.cfg.image_tokens((40, 90)) != model.cfg.image_tokens((90, 40))
    chat = ChatSession(model, ours, images=wide)
    assert chat.ask("What is this?", max_new_tokens=5) == generate(model, ours, "What is this?", wide,
                                                                 max_new_tokens=5)
    encoded = []
    original = model.vision_tower.forward
    model.vision_tower.forward = lambda px: encoded.append(px.shape[0]) or original(px)
    try:
        chat.messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]})
        chat.images.append(tall)
        cached = chat.prefill(chat.prompt_ids())
    finally:
        model.vision_tower.forward = original
    assert encoded == [model.cfg.image_tiles((90, 40))]  # only the new image's tiles
    assert (cached - _chat_full_logits(model, ours, chat)).abs().max() <= 1e-4
    chat.messages.pop()
    chat.images.pop()
    chat.ask("And this?", image=tall, max_new_tokens=4)
    chat.undo()
    assert len(chat.images) == 1 and len(chat.features) == 1
    chat.messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]})
    chat.images.append(square)  # another picture, another token count, where the undone one was
    cached = chat.prefill(chat.prompt_ids())
    assert (cached - _chat_full_logits(model, ours, chat)).abs().max() <= 1e-4
