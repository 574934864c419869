"""Our model against transformers' LlavaForConditionalGeneration, stage by stage, on the same files.

Each case writes a tiny checkpoint with transformers, loads it twice (ours, and
`LlavaForConditionalGeneration.from_pretrained`) and compares, in fp32:
  * the vision tower's hidden states at each requested layer (CLS included), against the
    `hidden_states` transformers' own `get_image_features` selects;
  * the selected vision features (`model.vision_tower(px)`: layers concatenated, CLS dropped or kept);
  * the projector, on the same input, and the projected image features end to end;
  * the logits of a prompt with images.
Then bf16 against transformers in bf16, and an fp16 checkpoint's default and overridden dtype.
"""

import dataclasses

import pytest
import torch

from llava_core.checkpoints.loader import checkpoint_dtype, load_pretrained
from llava_core.model.llama import Rotary
from llava_core.testing import make_tiny_checkpoint

FP32_TOL = 1e-4  # max abs difference, fp32 (the observed differences are ~1e-7 on logits of scale ~1)

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          # 64 < the prompt length, and head_dim 16 spans all three llama3 bands
          "original_max_position_embeddings": 64, "rope_theta": 500000.0}
CASES = {
    "default": {},  # GQA decoder (4 heads, 2 KV), layer -2, drop CLS
    "full_last": dict(vision_feature_layer=-1, vision_feature_select_strategy="full", image_seq_length=577),
    "layer_list": dict(vision_feature_layer=[-2, -3]),
    "layer_list_full_positive": dict(vision_feature_layer=[1, -1], vision_feature_select_strategy="full",
                                     image_seq_length=577),
    "tied": dict(text={"tie_word_embeddings": True}, tie_word_embeddings=True),
    "tied_top_level_only": dict(text={"tie_word_embeddings": False}, tie_word_embeddings=True),
    "rope_linear": dict(text={"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}}),
    "rope_llama3": dict(text={"rope_parameters": LLAMA3}),
    "rope_theta": dict(text={"rope_parameters": {"rope_type": "default", "rope_theta": 500.0}}),
}


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(case) -> folder, written once per session."""
    made = {}

    def get(case: str, **extra):
        if case not in made:
            made[case] = make_tiny_checkpoint(tmp_path_factory.mktemp(case), seed=1, **CASES.get(case, {}), **extra)
        return made[case]
    return get


def hf_load(folder, dtype=torch.float32):
    from transformers import LlavaForConditionalGeneration
    return LlavaForConditionalGeneration.from_pretrained(folder, dtype=dtype).eval()


def prompt_ids(cfg, images_per_row: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """(batch, T) random text ids with `images_per_row` expanded <image> runs, text between them."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        parts = [torch.randint(3, cfg.image_token_index, (5,), generator=g)]
        for _ in range(images_per_row):
            parts += [torch.full((cfg.num_image_tokens,), cfg.image_token_index),
                      torch.randint(3, cfg.image_token_index, (4,), generator=g)]
        rows.append(torch.cat(parts))
    return torch.stack(rows)


def pixels(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 336, 336, generator=torch.Generator().manual_seed(seed))


def max_diff(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def hf_vision(hf, px):
    """transformers' own selection: (selected hidden_states by layer, projected features (N, M, C))."""
    out = hf.model.get_image_features(pixel_values=px)
    return out.hidden_states, torch.stack(list(out.pooler_output))


@pytest.mark.parametrize("case", list(CASES))
def test_stages_match_transformers_fp32(checkpoint, case):
    folder = checkpoint(case)
    hf, ours = hf_load(folder), load_pretrained(folder)
    cfg = ours.cfg
    px = pixels(2)
    ids = prompt_ids(cfg, images_per_row=1)
    with torch.no_grad():
        ref_states, ref_feats = hf_vision(hf, px)
        states = ours.vision_tower.hidden_states(px, cfg.feature_layers)
        for layer, state in zip(cfg.feature_layers, states, strict=True):  # (N, 1+P, Dv), CLS first
            assert max_diff(state, ref_states[layer]) <= FP32_TOL, f"vision layer {layer}"
        # selection as transformers does it: drop CLS for "default", concatenate layers in order
        keep = 0 if cfg.vision_feature_select_strategy == "full" else 1
        ref_selected = torch.cat([ref_states[layer][:, keep:] for layer in cfg.feature_layers], dim=-1)
        selected = ours.vision_tower(px)
        assert selected.shape == (2, cfg.num_image_tokens, cfg.vision_feature_dim)
        assert max_diff(selected, ref_selected) <= FP32_TOL
        assert max_diff(ours.projector(ref_selected), hf.model.multi_modal_projector(ref_selected)) <= FP32_TOL
        assert max_diff(ours.image_features(px), ref_feats) <= FP32_TOL
        ref = hf(input_ids=ids, pixel_values=px).logits
        out = ours(ids, px)
    assert out.shape == ref.shape == (2, ids.shape[1], cfg.text.vocab_size)
    assert max_diff(out, ref) <= FP32_TOL


def test_vision_feature_counts(checkpoint):
    """The cases exercise what they claim: 577 tokens with CLS, two layers concatenated."""
    full = load_pretrained(checkpoint("full_last")).cfg
    assert (full.num_image_tokens, full.feature_layers, full.vision_feature_dim) == (577, [-1], 32)
    multi = load_pretrained(checkpoint("layer_list")).cfg
    assert (multi.num_image_tokens, multi.feature_layers, multi.vision_feature_dim) == (576, [-2, -3], 64)


@pytest.mark.parametrize("case", ["tied", "tied_top_level_only"])
def test_tied_embeddings_share_one_tensor(checkpoint, case):
    ours = load_pretrained(checkpoint(case))
    lm = ours.language_model
    assert ours.cfg.text.tie_word_embeddings
    assert lm.lm_head.weight is lm.embed_tokens.weight
    n_hf = sum(p.numel() for p in hf_load(checkpoint(case)).parameters())
    assert sum(p.numel() for p in ours.parameters()) == n_hf


@pytest.mark.parametrize("case", ["rope_linear", "rope_llama3", "rope_theta"])
def test_rope_settings_are_visible_in_the_logits(checkpoint, case):
    """Guard for the parity test above: the same model with plain rope (theta 10000, no
    scaling) misses transformers by far more than the tolerance, so the rope cases can fail."""
    folder = checkpoint(case)
    hf, ours = hf_load(folder), load_pretrained(folder)
    assert ours.cfg.text.rope_scaling is not None or ours.cfg.text.rope_theta != 10000.0
    plain = dataclasses.replace(ours.cfg.text, rope_scaling=None, rope_theta=10000.0)
    ours.language_model.rotary = Rotary(plain)
    ids, px = prompt_ids(ours.cfg, images_per_row=1), pixels(2)
    with torch.no_grad():
        assert max_diff(ours(ids, px), hf(input_ids=ids, pixel_values=px).logits) > 30 * FP32_TOL


def test_two_images_in_one_prompt(checkpoint):
    folder = checkpoint("default")
    hf, ours = hf_load(folder), load_pretrained(folder)
    ids = prompt_ids(ours.cfg, images_per_row=2)  # images 0, 1 in row 0; 2, 3 in row 1
    px = pixels(4, seed=3)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=px).logits
        out = ours(ids, px)
        swapped = ours(ids, px[[1, 0, 2, 3]])  # the order of images must matter
    assert max_diff(out, ref) <= FP32_TOL
    assert max_diff(swapped, ref) > 30 * FP32_TOL


def test_bf16_matches_transformers_bf16(checkpoint):
    """Both in bf16 against the fp32 reference: our rounding error is of the same size as
    transformers' (<= 2x), and the two bf16 models agree within 2% of the logits' range."""
    folder = checkpoint("default")
    hf32 = hf_load(folder)
    hf16, ours = hf_load(folder, torch.bfloat16), load_pretrained(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    ids, px = prompt_ids(ours.cfg, images_per_row=1), pixels(2)
    with torch.no_grad():
        ref32 = hf32(input_ids=ids, pixel_values=px).logits
        ref = hf16(input_ids=ids, pixel_values=px.bfloat16()).logits
        out = ours(ids, px.bfloat16())
        feats = ours.image_features(px.bfloat16())
        _, ref_feats = hf_vision(hf16, px.bfloat16())
    assert out.dtype == torch.bfloat16
    scale = ref32.abs().max().item()
    ours_err, hf_err = max_diff(out, ref32), max_diff(ref, ref32)
    assert ours_err <= 2 * hf_err, f"bf16 error vs fp32: ours {ours_err:.2e}, transformers {hf_err:.2e}"
    assert max_diff(out, ref) <= 0.02 * scale, f"{max_diff(out, ref):.2e} vs logits scale {scale:.2f}"
    assert max_diff(feats, ref_feats) <= 0.02 * ref_feats.float().abs().max().item()


def test_fp16_checkpoint_dtypes(checkpoint):
    """An fp16 checkpoint loads as bf16 on CPU by default (fp16 matmuls crawl there), as fp32
    when asked, and both hold exactly the stored values (rounded to bf16 for the default)."""
    folder = checkpoint("fp16", dtype=torch.float16)
    assert checkpoint_dtype(folder) == torch.float16
    hf16 = hf_load(folder, torch.float16)
    default, fp32 = load_pretrained(folder), load_pretrained(folder, dtype=torch.float32)
    assert {p.dtype for p in default.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in fp32.parameters()} == {torch.float32}
    emb = hf16.model.language_model.embed_tokens.weight
    assert torch.equal(fp32.language_model.embed_tokens.weight, emb.float())
    assert torch.equal(default.language_model.embed_tokens.weight, emb.to(torch.bfloat16))
    proj = hf16.model.multi_modal_projector.linear_1.weight
    assert torch.equal(fp32.projector.linear_1.weight, proj.float())

    hf32 = hf_load(folder, torch.float32)  # upcasts the same fp16 values
    ids, px = prompt_ids(fp32.cfg, images_per_row=1), pixels(2)
    with torch.no_grad():
        assert max_diff(fp32(ids, px), hf32(input_ids=ids, pixel_values=px).logits) <= FP32_TOL
