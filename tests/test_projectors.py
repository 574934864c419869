"""The projector registry: every kind emits the token count its name promises, the config and
the processor follow that count, and every kind survives save_llava_hf -> load_pretrained with
bit-identical logits. Tiny tower: 64 px images, 16 px patches, a 4x4 grid of 16 patches."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from llava_core.checkpoints.export import save_llava_hf
from llava_core.checkpoints.loader import load_pretrained
from llava_core.model.config import ConfigError, LlavaConfig, ProjectorConfig, projector_tokens
from llava_core.model.llava import LlavaModel
from llava_core.model.processor import LlavaProcessor
from llava_core.model.projector import PROJECTORS, build_projector
from llava_core.testing import make_tiny_checkpoint, transformers_embeds

# kind, config overrides -> tokens per image (16 patches, 4x4; vision 32-d, text 64-d)
CASES = {
    "linear": ("linear", {}, 16),
    "mlp2x_gelu": ("mlp2x_gelu", {}, 16),
    "mlp3x_gelu": ("mlp3x_gelu", {}, 16),
    "mlp2x_gelu_pos": ("mlp2x_gelu_pos", {}, 16),
    "mlp2x_gelu_cols": ("mlp2x_gelu_cols", {}, 32),
    "mlp2x_gelu_newline": ("mlp2x_gelu_newline", {}, 20),  # 4 rows of 4 + 1
    "mlp2x_gelu_full": ("mlp2x_gelu", dict(vision_feature_select_strategy="full"), 17),
    "identity": ("identity", dict(vision_feature_layer=[-2, -3]), 16),  # 2 x 32-d = the 64-d text width
    "avgpool2_mlp2x_gelu": ("avgpool2_mlp2x_gelu", {}, 4),
    "avgpool4_mlp2x_gelu": ("avgpool4_mlp2x_gelu", {}, 1),
    "shuffle2_mlp2x_gelu": ("shuffle2_mlp2x_gelu", {}, 4),
    "cabstractor": ("cabstractor", {}, 4),
    "cabstractor9": ("cabstractor9", dict(vision_feature_layer=[-1, -2]), 9),  # 4x4 -> 3x3
    "ldp": ("ldp", {}, 4),
    "resampler8": ("resampler8", {}, 8),
    "resampler5_full": ("resampler5", dict(vision_feature_select_strategy="full"), 5),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny transformers-written checkpoint: its tokenizer, processor files and config."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny64"), seed=0, image_seq_length=16,
                                vision=dict(image_size=64, patch_size=16))


def config(base, kind: str, **overrides) -> LlavaConfig:
    cfg = LlavaConfig.from_json(base)
    overrides.setdefault("image_seq_length", None)  # the base file's 16 is for mlp2x_gelu
    return dataclasses.replace(cfg, projector=ProjectorConfig(kind=kind), **overrides)


def random_model(cfg: LlavaConfig, seed: int = 0) -> LlavaModel:
    torch.manual_seed(seed)
    model = LlavaModel(cfg).eval()
    with torch.no_grad():  # norms start at ones/zeros: make every tensor distinct
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def checkpoint(base, model: LlavaModel, folder):
    """save_llava_hf, plus the base folder's tokenizer and processor files (strategy updated)."""
    save_llava_hf(model, folder)
    for f in base.iterdir():
        if f.suffix != ".safetensors" and f.name not in ("config.json", "generation_config.json"):
            shutil.copy(f, folder / f.name)
    proc = json.loads((folder / "processor_config.json").read_text())
    proc["vision_feature_select_strategy"] = model.cfg.vision_feature_select_strategy
    (folder / "processor_config.json").write_text(json.dumps(proc))
    return folder


def image(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (80, 70, 3), dtype=np.uint8))


@pytest.mark.parametrize("case", list(CASES))
def test_output_shape_num_tokens_and_config_agree(base, case):
    kind, overrides, tokens = CASES[case]
    cfg = config(base, kind, **overrides)
    n = cfg.num_vision_tokens
    proj = build_projector(cfg.projector, cfg.vision_feature_dim, cfg.text.hidden_size, n)
    x = torch.randn(2, n, cfg.vision_feature_dim)  # (B, N, Dv)
    with torch.no_grad():
        out = proj(x)
    assert out.shape == (2, tokens, cfg.text.hidden_size)
    assert proj.num_tokens(n) == projector_tokens(kind, n) == cfg.num_image_tokens == tokens


@pytest.mark.parametrize("case", list(CASES))
def test_save_load_round_trip_and_processor(base, tmp_path, case):
    kind, overrides, tokens = CASES[case]
    model = random_model(config(base, kind, **overrides))
    folder = checkpoint(base, model, tmp_path / "ckpt")
    saved = json.loads((folder / "config.json").read_text())
    assert saved.get("llava_core_projector", "mlp2x_gelu") == kind
    assert saved["image_seq_length"] == tokens

    loaded = load_pretrained(folder)
    assert loaded.cfg.projector == model.cfg.projector and loaded.cfg.num_image_tokens == tokens
    proc = LlavaProcessor.from_pretrained(folder)
    enc = proc(text=proc.prompt("What is in the image?"), images=image())
    assert int((enc["input_ids"] == proc.cfg.image_token_index).sum()) == tokens
    with torch.no_grad():
        want = model(enc["input_ids"], enc["pixel_values"], enc["attention_mask"])
        got = loaded(enc["input_ids"], enc["pixel_values"], enc["attention_mask"])
    assert torch.equal(got, want)


def test_every_family_is_covered():
    from llava_core.model.config import parse_projector
    assert {parse_projector(kind)[0] for kind, _, _ in CASES.values()} == set(PROJECTORS)


# --- errors that name the thing at fault -------------------------------------------------

def test_identity_with_mismatched_widths(base):
    with pytest.raises(ConfigError, match=r"identity.*32-d.*hidden_size is 64"):
        config(base, "identity")
    with pytest.raises(ConfigError, match=r"identity.*32-d.*64"):
        build_projector(ProjectorConfig(kind="identity"), 32, 64)


def test_grid_projectors_need_a_square_patch_count(base):
    for kind in ("avgpool2_mlp2x_gelu", "shuffle2_mlp2x_gelu", "cabstractor", "ldp"):
        with pytest.raises(ConfigError, match=rf"{kind}.*N=15"):
            projector_tokens(kind, 15)
        proj = build_projector(ProjectorConfig(kind=kind), 32, 64)
        with pytest.raises(ConfigError, match=r"N=15"):
            proj(torch.randn(1, 15, 32))  # (B, N, Dv), N not a square
        with pytest.raises(ConfigError, match=rf"{kind}.*CLS.*'full'"):
            config(base, kind, vision_feature_select_strategy="full")  # 17 tokens: refused, CLS not dropped


def assert_grid_errors(base, proj) -> None:
    """What every grid MLP projector (built for a 4x4 grid) refuses, each error naming the fault:
    no grid size, another grid's tokens, a CLS token kept."""
    kind = proj.kind
    with pytest.raises(ConfigError, match=rf"{kind}.*n_tokens"):
        build_projector(ProjectorConfig(kind=kind), 32, 64)
    with pytest.raises(ConfigError, match=r"4x4 patch grid, got 9 tokens"):
        proj(torch.randn(1, 9, 32))
    with pytest.raises(ConfigError, match=rf"{kind}.*CLS.*'full'"):
        config(base, kind, vision_feature_select_strategy="full")


def test_positional_mlp_adds_a_row_and_a_column_embedding_to_each_token(base):
    """mlp2x_gelu_pos = mlp2x_gelu (same weights) + row_embed[r] + col_embed[c] at token r*4 + c;
    it needs the grid size, a square grid and no CLS."""
    torch.manual_seed(0)
    pos = build_projector(ProjectorConfig(kind="mlp2x_gelu_pos"), 32, 64, n_tokens=16)
    assert pos.row_embed.shape == pos.col_embed.shape == (4, 64) and not pos.row_embed.any()  # starts as mlp2x_gelu
    plain = build_projector(ProjectorConfig(kind="mlp2x_gelu"), 32, 64)
    plain.load_state_dict({k: v for k, v in pos.state_dict().items() if k.startswith("linear_")})
    with torch.no_grad():
        pos.row_embed.normal_()
        pos.col_embed.normal_()
        x = torch.randn(2, 16, 32)  # (B, N, Dv)
        added = pos(x) - plain(x)  # (B, 16, 64)
    for r in range(4):
        for c in range(4):
            want = pos.row_embed[r] + pos.col_embed[c]
            assert torch.allclose(added[:, r * 4 + c], want.expand(2, 64), atol=1e-5)
    with pytest.raises(ConfigError, match=r"mlp2x_gelu_pos.*N=15"):
        build_projector(ProjectorConfig(kind="mlp2x_gelu_pos"), 32, 64, n_tokens=15)
    assert_grid_errors(base, pos)


def test_columns_projector_repeats_the_tokens_in_column_major_order(base):
    """mlp2x_gelu_cols = mlp2x_gelu's 16 tokens (same weights), then token r*4 + c again at place
    16 + c*4 + r; it needs the grid size and a square grid."""
    torch.manual_seed(0)
    cols = build_projector(ProjectorConfig(kind="mlp2x_gelu_cols"), 32, 64, n_tokens=16)
    plain = build_projector(ProjectorConfig(kind="mlp2x_gelu"), 32, 64)
    assert cols.state_dict().keys() == plain.state_dict().keys()  # mlp2x_gelu's checkpoints load into it
    plain.load_state_dict(cols.state_dict())
    with torch.no_grad():
        x = torch.randn(2, 16, 32)  # (B, N, Dv)
        y, want = cols(x), plain(x)  # (B, 32, 64), (B, 16, 64)
    assert y.shape == (2, 32, 64)
    assert torch.equal(y[:, :16], want)
    for r in range(4):
        for c in range(4):
            assert torch.equal(y[:, 16 + c * 4 + r], want[:, r * 4 + c]), (r, c)
    assert_grid_errors(base, cols)


def test_newline_projector_ends_each_row_with_its_learned_vector(base):
    """mlp2x_gelu_newline = mlp2x_gelu's 16 tokens (same weights), row r's token c at place r*5 + c,
    and image_newline at places 4, 9, 14, 19; it needs the grid size, a square grid and no CLS."""
    torch.manual_seed(0)
    nl = build_projector(ProjectorConfig(kind="mlp2x_gelu_newline"), 32, 64, n_tokens=16)
    plain = build_projector(ProjectorConfig(kind="mlp2x_gelu"), 32, 64)
    assert nl.image_newline.shape == (64,) and 0.5 < float(nl.image_newline.norm()) < 2  # std 1/√64
    plain.load_state_dict({k: v for k, v in nl.state_dict().items() if k.startswith("linear_")})
    with torch.no_grad():
        x = torch.randn(2, 16, 32)  # (B, N, Dv)
        y, want = nl(x), plain(x)  # (B, 20, 64), (B, 16, 64)
    assert y.shape == (2, 20, 64)
    for r in range(4):
        assert torch.equal(y[:, r * 5 + 4], nl.image_newline.expand(2, 64)), r
        for c in range(4):
            assert torch.equal(y[:, r * 5 + c], want[:, r * 4 + c]), (r, c)
    nl(x).sum().backward()  # the newline is in 2 images x 4 rows
    assert nl.image_newline.grad is not None and torch.equal(nl.image_newline.grad, torch.full((64,), 8.0))
    assert_grid_errors(base, nl)


@pytest.mark.parametrize("kind, tokens", [("mlp2x_gelu_cols", 32), ("mlp2x_gelu_newline", 20)])
def test_grid_model_matches_transformers_given_the_same_additions(base, tmp_path, kind, tokens):
    """Oracle for whole mlp2x_gelu_cols and mlp2x_gelu_newline models: transformers'
    LlavaForConditionalGeneration on the exported checkpoint computes the tower, the MLP (the same
    tensors as mlp2x_gelu) and the decoder; only the column-major repeat, or the newline after each
    row (its vector read from the checkpoint file: transformers' Llava skips it), is done here, on
    transformers' own projected features. Logits at every place agree to 1e-4 (fp32)."""
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    model = random_model(config(base, kind))
    folder = checkpoint(base, model, tmp_path / "ckpt")
    tensors = {k: v for f in folder.glob("*.safetensors") for k, v in load_file(f).items()}
    hf = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    proc = LlavaProcessor.from_pretrained(folder)
    enc = proc(text=proc.prompt("What is in the image?"), images=image())
    ids = enc["input_ids"]
    with torch.no_grad():
        ours = model(ids, enc["pixel_values"], enc["attention_mask"])  # (1, T, V)
        embeds = transformers_embeds(hf, ids, enc["pixel_values"], proc.cfg.image_token_index, kind,
                                     newline=tensors.get("multi_modal_projector.image_newline"))
        theirs = hf(inputs_embeds=embeds, attention_mask=enc["attention_mask"]).logits
    assert int((ids == proc.cfg.image_token_index).sum()) == tokens
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_grid_that_does_not_divide(base):
    with pytest.raises(ConfigError, match=r"avgpool3_mlp2x_gelu.*4x4.*N=16.*divide by 3"):
        config(base, "avgpool3_mlp2x_gelu")
    with pytest.raises(ConfigError, match=r"'ldp'.*3x3.*N=9"):
        projector_tokens("ldp", 9)
    with pytest.raises(ConfigError, match=r"cabstractor25.*M=25.*4x4"):
        config(base, "cabstractor25")


def test_unknown_projector_lists_the_known_names(base, tmp_path):
    with pytest.raises(ConfigError, match=r"'mlp2x_relu' is unknown; known: linear, mlpNx_gelu, "
                                          r"mlpNx_gelu_pos, mlpNx_gelu_cols, mlpNx_gelu_newline, identity, "
                                          r"avgpoolK_mlp2x_gelu, shuffleK_mlp2x_gelu, "
                                          r"cabstractor\[M\], ldp, resamplerQ"):
        ProjectorConfig(kind="mlp2x_relu")
    d = json.loads((base / "config.json").read_text())
    d["llava_core_projector"] = "qformer"
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=rf"{tmp_path}.*'qformer' is unknown"):
        LlavaConfig.from_json(tmp_path)


def test_image_seq_length_cross_check_follows_the_projector(base):
    assert config(base, "avgpool2_mlp2x_gelu", image_seq_length=4).num_image_tokens == 4
    with pytest.raises(ConfigError, match=r"image_seq_length=16.*4 image tokens.*avgpool2_mlp2x_gelu"):
        config(base, "avgpool2_mlp2x_gelu", image_seq_length=16)


def test_shuffle_puts_each_2x2_block_of_patches_side_by_side_in_one_token():
    """shuffle2 on a 4x4 grid: token (r, c) of the 2x2 output is the MLP of the concatenation of
    patches (2r, 2c), (2r, 2c+1), (2r+1, 2c), (2r+1, 2c+1), in that order; nothing is pooled."""
    torch.manual_seed(0)
    proj = build_projector(ProjectorConfig(kind="shuffle2_mlp2x_gelu"), 8, 16)
    x = torch.randn(2, 16, 8)  # (B, N, Dv), row-major 4x4
    out = proj(x)  # (B, 4, Dt)
    for r in range(2):
        for c in range(2):
            block = [x[:, (2 * r + i) * 4 + 2 * c + j] for i in range(2) for j in range(2)]
            want = proj.linear_2(torch.nn.functional.gelu(proj.linear_1(torch.cat(block, -1))))
            assert torch.allclose(out[:, r * 2 + c], want, atol=1e-6)
    with pytest.raises(ConfigError, match=r"shuffle3_mlp2x_gelu.*4x4.*divide by 3"):
        projector_tokens("shuffle3_mlp2x_gelu", 16)


# The docstring table of projector.py: ViT-L/14-336 (1024-d, 576 patches) into a 4096-d decoder.
VIT_L = {"linear": (576, 4_198_400), "mlp2x_gelu": (576, 20_979_712), "mlp2x_gelu_pos": (576, 21_176_320),
         "mlp2x_gelu_cols": (1152, 20_979_712), "mlp2x_gelu_newline": (600, 20_983_808),
         "avgpool2_mlp2x_gelu": (144, 20_979_712), "shuffle2_mlp2x_gelu": (144, 33_562_624),
         "cabstractor": (144, 29_429_760), "cabstractor144": (144, 29_429_760), "ldp": (144, 54_640_640),
         "resampler64": (64, 33_645_568)}


@pytest.mark.parametrize("kind", list(VIT_L))
def test_docstring_counts_for_vit_l(kind):
    with torch.device("meta"):
        proj = build_projector(ProjectorConfig(kind=kind), 1024, 4096, n_tokens=576)
    assert (proj.num_tokens(576), sum(p.numel() for p in proj.parameters())) == VIT_L[kind]
