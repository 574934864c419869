"""export.save_llava_hf: our model -> a llava-hf hub-layout folder that we and transformers load
back to the same parameters and logits; both directions read keymap's one table."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from llava_core.checkpoints import export
from llava_core.checkpoints.export import parse_size, save_llava_hf
from llava_core.checkpoints.keymap import hub_names, map_key
from llava_core.checkpoints.loader import load_pretrained
from llava_core.model.config import LlavaConfig, ProjectorConfig, TextConfig, VisionConfig
from llava_core.model.llava import LlavaModel
from llava_core.testing import make_tiny_checkpoint

FP32_TOL = 1e-4

VISION = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                      image_size=64, patch_size=16)
CASES = {
    # GQA, tied embeddings, SmolLM2's rope theta, an eos list: the default model's decoder shape
    "default": dict(vision_feature_layer=-2, vision_feature_select_strategy="default",
                    text=dict(tie_word_embeddings=True, rope_theta=100000.0, eos_token_id=[2, 0])),
    "full_last_untied": dict(vision_feature_layer=-1, vision_feature_select_strategy="full",
                             text=dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "layer_list": dict(vision_feature_layer=[-2, -3]),
}


def tiny_model(case: str, seed: int = 0) -> LlavaModel:
    kw = dict(CASES[case])
    text = TextConfig(**{**dict(vocab_size=120, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                                pad_token_id=3), **kw.pop("text", {})})
    cfg = LlavaConfig(vision=VISION, text=text, image_token_index=119, **kw)
    torch.manual_seed(seed)
    model = LlavaModel(cfg).eval()
    with torch.no_grad():  # LayerNorm/RMSNorm start at ones/zeros: make every tensor distinct
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def same_config(a: LlavaConfig, b: LlavaConfig) -> bool:
    """Equal but for image_seq_length, a cross-check field the file writes and a built config may omit."""
    return dataclasses.replace(a, image_seq_length=None) == dataclasses.replace(b, image_seq_length=None)


def prompt(cfg: LlavaConfig, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(4, cfg.image_token_index, (batch, 7), generator=g)
    image = torch.full((batch, cfg.num_image_tokens), cfg.image_token_index)
    ids = torch.cat([text[:, :3], image, text[:, 3:]], dim=1)  # (B, 3 + M + 4)
    return ids, torch.randn(batch, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)


@pytest.mark.parametrize("case", list(CASES))
def test_reverse_table_inverts_the_loader_rules(case):
    model = tiny_model(case)
    seen = set()
    for name in model.state_dict():
        for key, part in hub_names(name):
            assert map_key(key) == name + (f"[{part}]" if part else ""), key
            assert key.startswith(("language_model.model.", "language_model.lm_head.",
                                   "vision_tower.vision_model.", "multi_modal_projector.")), key
            assert key not in seen
            seen.add(key)


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_gives_identical_parameters_and_config(tmp_path, case):
    model = tiny_model(case)
    folder = save_llava_hf(model, tmp_path / "ckpt")
    loaded = load_pretrained(folder)
    assert same_config(loaded.cfg, model.cfg)
    want = model.state_dict()
    got = loaded.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    keys = load_file(str(folder / "model.safetensors"))
    assert ("language_model.lm_head.weight" in keys) == (not model.cfg.text.tie_word_embeddings)
    assert "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight" in keys


def test_sharded_fp16(tmp_path):
    model = tiny_model("full_last_untied")
    folder = save_llava_hf(model, tmp_path / "ckpt", dtype=torch.float16, shard_size="60KB")
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert all(s.stat().st_size <= 60_000 + 10_000 for s in shards)  # header and one large tensor aside
    loaded = load_pretrained(folder, dtype=torch.float32)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.half().float()), k
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "float16"


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_loads_it_with_the_same_logits(tmp_path, case):
    from transformers import LlavaForConditionalGeneration

    model = tiny_model(case)
    folder = save_llava_hf(model, tmp_path / "ckpt")
    hf, info = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    ids, px = prompt(model.cfg)
    with torch.no_grad():
        ours = model(ids, px)
        theirs = hf.eval()(input_ids=ids, pixel_values=px).logits
    assert (ours - theirs).abs().max() <= FP32_TOL
    assert hf.config.text_config.eos_token_id == model.cfg.text.eos_token_id


def test_resaving_a_transformers_checkpoint_keeps_every_tensor(tmp_path):
    src = make_tiny_checkpoint(tmp_path / "src", seed=5, layout="hub")
    folder = save_llava_hf(load_pretrained(src), tmp_path / "resaved")
    want, got = load_file(str(src / "model.safetensors")), load_file(str(folder / "model.safetensors"))
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert LlavaConfig.from_json(folder) == LlavaConfig.from_json(src)


def test_atomic_write_and_replace(tmp_path, monkeypatch):
    model = tiny_model("default")
    target = tmp_path / "ckpt"
    save_llava_hf(model, target)
    before = (target / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")
    monkeypatch.setattr(export, "write_safetensors", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_llava_hf(tiny_model("default", seed=1), target)
    assert (target / "model.safetensors").read_bytes() == before  # the old checkpoint is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp folder left behind
    monkeypatch.undo()

    save_llava_hf(tiny_model("default", seed=1), target)  # replaces the whole checkpoint
    assert (target / "model.safetensors").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert oct((target / "model.safetensors").stat().st_mode & 0o777) == oct(0o644)

    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="notes"):
        save_llava_hf(model, other)
    assert (other / "todo.txt").read_text() == "keep me"


def test_config_names_the_projector_transformers_cannot_build(tmp_path):
    model = tiny_model("default")
    cfg = LlavaConfig(vision=VISION, text=model.cfg.text, projector=ProjectorConfig(kind="linear"),
                      image_token_index=119)
    folder = save_llava_hf(LlavaModel(cfg), tmp_path / "ckpt")
    assert load_pretrained(folder).cfg.projector.kind == "linear"


def test_parse_size():
    assert parse_size(1234) == 1234
    assert parse_size("200KB") == 200_000
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5MB") == 1_500_000
    with pytest.raises(ValueError, match="shard_size"):
        parse_size("lots")
