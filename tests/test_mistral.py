"""Mistral decoders (bakLlava: LLaVA-1.5 + Mistral) and the sliding attention window, against
transformers on tiny random checkpoints it wrote.

Tolerances: logits within 1e-4 (fp32), greedy tokens equal, ids identical. The window test
uses a window of 8 over sequences of up to 30 tokens, so it bites: the same model with the
window ignored is checked to be far off (> 1e-2), so the test can tell.
"""

import json

import pytest
import torch

from llava_core.checkpoints.loader import load_pretrained
from llava_core.model.config import MISTRAL_DEFAULTS, ConfigError, LlavaConfig
from llava_core.model.llama import LlamaDecoder
from llava_core.model.processor import LlavaProcessor
from llava_core.runtime.cuda_graph import static_step
from llava_core.runtime.decode import SamplingParams, decode_one, generate_tokens, prefill
from llava_core.testing import MISTRAL_TEMPLATE, make_tiny_checkpoint, reference_processor


@pytest.fixture(scope="module")
def bakllava(tmp_path_factory):
    """bakLlava-shaped: LLaVA-1.5 with a Mistral decoder (no window), a Mistral chat template."""
    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("bak"), seed=1,
                                  text=dict(model_type="mistral", sliding_window=None))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": MISTRAL_TEMPLATE}))
    return folder


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    """A Mistral decoder whose window (8) is shorter than the sequences below."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("win"), seed=2,
                                text=dict(model_type="mistral", sliding_window=8))


def _hf(folder, attn="sdpa"):
    from transformers import LlavaForConditionalGeneration
    return LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32, attn_implementation=attn).eval()


def test_bakllava_logits_and_greedy_match(bakllava):
    import numpy as np
    from PIL import Image

    ours = LlavaProcessor.from_pretrained(bakllava)
    ref_proc = reference_processor(bakllava)
    # the checkpoint's Mistral template is used as is
    text = ours.prompt("What is shown?")
    assert text == "[INST] <image>\nWhat is shown? [/INST]"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    assert text == ref_proc.apply_chat_template(messages, add_generation_prompt=True)
    rng = np.random.default_rng(0)
    ims = [Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)) for _ in range(2)]
    texts = [text, ours.prompt("Describe the picture in detail.")]
    enc = ours(text=texts, images=ims)
    ref_enc = ref_proc(text=texts, images=ims, return_tensors="pt", padding=True)
    assert torch.equal(enc["input_ids"], ref_enc["input_ids"])
    assert torch.equal(enc["pixel_values"], ref_enc["pixel_values"])

    model, ref = load_pretrained(bakllava, dtype=torch.float32), _hf(bakllava)
    assert type(ref.model.language_model).__name__ == "MistralModel"
    with torch.no_grad():
        a = model(enc["input_ids"], enc["pixel_values"], enc["attention_mask"])
        b = ref(**enc).logits
    assert (a - b)[enc["attention_mask"].bool()].abs().max() <= 1e-4
    # this seed's greedy answer ends with EOS (2) at step 3: both stop there, finished rows padded
    pad = model.cfg.text.pad_token_id
    steps = generate_tokens(model, enc["input_ids"], SamplingParams(max_new_tokens=8), [2], enc["pixel_values"],
                            enc["attention_mask"], pad)
    want = ref.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=pad)[:, enc["input_ids"].shape[1]:]
    got = torch.stack(list(steps), dim=1)
    assert torch.equal(got, want) and (got == 2).any()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_sliding_window_logits_match(windowed, attn):
    model, ref = load_pretrained(windowed, dtype=torch.float32), _hf(windowed, attn)
    assert model.cfg.text.sliding_window == 8 and ref.config.text_config.sliding_window == 8
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 399, (2, 30), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding: the window counts real tokens
    real = mask.bool()
    with torch.no_grad():
        a = model(ids, attention_mask=mask)
        b = ref(input_ids=ids, attention_mask=mask).logits
        assert (a - b)[real].abs().max() <= 1e-4
        model.cfg.text.sliding_window = None  # the same weights with the window ignored
        try:
            assert (model(ids, attention_mask=mask) - b)[real].abs().max() > 1e-2
        finally:
            model.cfg.text.sliding_window = 8


def test_sliding_window_greedy_through_the_cache(windowed):
    # a 12-token prompt and 16 new tokens: decode steps past the window read only its last 8 keys
    model, ref = load_pretrained(windowed, dtype=torch.float32), _hf(windowed)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 399, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    steps = generate_tokens(model, ids, SamplingParams(max_new_tokens=16), [], attention_mask=mask)
    want = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, min_new_tokens=16,
                        do_sample=False)[:, ids.shape[1]:]
    assert torch.equal(torch.stack(list(steps), dim=1), want)


def test_sliding_window_fixed_shape_step_matches_eager(windowed):
    # cuda_graph.static_step (plain PyTorch here) applies the same window as decode_one
    model = load_pretrained(windowed, dtype=torch.float32)
    ids = torch.randint(3, 399, (2, 14), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        caches = [model.new_cache(2, 32) for _ in range(2)]
        logits = [prefill(model, ids, c, attention_mask=mask) for c in caches]
        tokens = logits[0].argmax(-1)
        for _ in range(6):  # from 14 slots to 20: past the window of 8
            eager = decode_one(model, tokens, caches[0])
            slot = torch.tensor([caches[1].length])
            fixed = static_step(model, tokens, slot, caches[1])
            _advance(caches[1])
            assert (eager - fixed).abs().max() <= 1e-4
            tokens = eager.argmax(-1)


def _advance(cache):
    """What GraphedStep does after a replay: count the slot it wrote."""
    cache.next_pos += 1
    cache.length += 1


# --- config ---------------------------------------------------------------------------------

def _config_dict(folder):
    return json.loads((folder / "config.json").read_text())


def test_sparse_mistral_config_reads_as_transformers(windowed):
    # a hub file written by transformers 4.x names only what differs from MistralConfig's defaults
    from transformers import LlavaConfig as HFLlavaConfig
    d = _config_dict(windowed)
    d["text_config"] = {"model_type": "mistral", "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
                        "vocab_size": 32064}
    ours = LlavaConfig.from_hf_dict(d).text
    hf = HFLlavaConfig(**d).text_config
    for key in ("intermediate_size", "num_key_value_heads", "sliding_window", "hidden_size", "num_hidden_layers",
                "num_attention_heads", "max_position_embeddings", "head_dim", "rms_norm_eps", "vocab_size"):
        assert getattr(ours, key) == getattr(hf, key), key
    assert ours.sliding_window == MISTRAL_DEFAULTS["sliding_window"] == 4096


def test_non_llama_shaped_decoders_refused(windowed):
    d = _config_dict(windowed)
    for kind in ("qwen2", "gemma"):
        with pytest.raises(ConfigError, match=f"text_config.model_type='{kind}' is not supported"):
            LlavaConfig.from_hf_dict({**d, "text_config": {**d["text_config"], "model_type": kind}})


def test_window_on_llama_refused_not_ignored(windowed):
    d = _config_dict(windowed)
    with pytest.raises(ConfigError, match="text_config.sliding_window=8 with model_type 'llama'"):
        LlavaConfig.from_hf_dict({**d, "text_config": {**d["text_config"], "model_type": "llama"}})
    with pytest.raises(ConfigError, match="text_config.sliding_window=0"):
        LlavaConfig.from_hf_dict({**d, "text_config": {**d["text_config"], "sliding_window": 0}})


def test_window_in_packed_segments():
    # training's packed turns: a window of 3 equals running each turn alone with the window
    from llava_core.model.config import TextConfig
    torch.manual_seed(0)
    cfg = TextConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=2, sliding_window=3)
    dec = LlamaDecoder(cfg).eval()
    x = torch.randn(1, 10, 32)
    segments = torch.tensor([[0, 0, 1, 1, 1, 1, 2, 2, 2, 2]])
    with torch.no_grad():
        packed = dec(x, segments=segments)
        for seg in (1, 2):
            alone = dec(torch.cat([x[:, :2], x[:, segments[0] == seg]], dim=1))
            assert (packed[:, segments[0] == seg] - alone[:, 2:]).abs().max() <= 1e-5


def test_export_keeps_the_window(tmp_path, windowed):
    # a windowed decoder is written as Mistral with its window, never as a plain LLaMA
    from llava_core.checkpoints.export import save_llava_hf
    model = load_pretrained(windowed, dtype=torch.float32)
    folder = save_llava_hf(model, tmp_path / "out")
    text = json.loads((folder / "config.json").read_text())["text_config"]
    assert text["model_type"] == "mistral" and text["sliding_window"] == 8
    ref = _hf(folder)
    ids = torch.randint(3, 399, (1, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (model(ids) - ref(input_ids=ids).logits).abs().max() <= 1e-4
