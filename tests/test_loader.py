"""The loader: every llava-hf layout to the same parameters, and a clear error for every broken checkpoint.

transformers is the oracle throughout: its parameters are the values each of ours must hold,
and its config reader says what a sparse hub config.json means.
"""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from llava_core.checkpoints.keymap import map_key, qkv_rows
from llava_core.checkpoints.loader import CheckpointError, checkpoint_dtype, load_pretrained
from llava_core.model.config import ConfigError, LlavaConfig
from llava_core.testing import make_tiny_checkpoint

# --- checkpoints shared by the session -------------------------------------------------------


@pytest.fixture(scope="session")
def hf5(tmp_path_factory):
    """transformers-5 save layout, one file (seed 3: the same weights as `hub` and `sharded`)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("hf5"), seed=3)


@pytest.fixture(scope="session")
def hub(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("hub"), seed=3, layout="hub")


@pytest.fixture(scope="session")
def sharded(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("sharded"), seed=3, shard_size="200KB")


@pytest.fixture(scope="session")
def hf_model(hf5):
    from transformers import LlavaForConditionalGeneration
    return LlavaForConditionalGeneration.from_pretrained(hf5, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def in_memory(tmp_path_factory, hf5, hf_model):
    """Layout (c): a safetensors file keyed by transformers-5 `model.state_dict()` names."""
    folder = tmp_path_factory.mktemp("in_memory")
    shutil.copy(hf5 / "config.json", folder)
    sd = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    assert {k.split(".")[0] for k in sd} == {"model", "lm_head"}
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="session")
def reference(hf5):
    return load_pretrained(hf5).state_dict()


def weight_keys(folder):
    keys = []
    for f in sorted(folder.glob("*.safetensors")):
        keys += list(load_file(str(f)))
    return keys


def assert_same_parameters(sd, reference):
    assert sd.keys() == reference.keys()
    for k in reference:
        assert torch.equal(sd[k], reference[k]), k


# --- layouts ---------------------------------------------------------------------------------


def test_every_transformers_parameter_lands_in_its_place(hf_model, reference):
    """Each tensor of transformers' model, through map_key, equals the parameter it fills."""
    filled = set()
    for key, value in hf_model.state_dict().items():
        name = map_key(key)
        part = None
        if name.endswith("]"):  # q/k/v of a packed in_proj
            name, part = name[:-3], name[-2]
        target = reference[name] if part is None else qkv_rows(reference[name], part)
        assert torch.equal(target, value), f"{key} -> {name}"
        filled.add(name)
    assert filled == set(reference)


@pytest.mark.parametrize("layout", ["hub", "sharded", "in_memory"])
def test_layouts_load_to_identical_parameters(request, reference, layout):
    folder = request.getfixturevalue(layout)
    keys = weight_keys(folder)
    if layout == "hub":  # the transformers-4.x spelling really is what was written
        assert any(k.startswith("vision_tower.vision_model.") for k in keys)
        assert any(k.startswith("language_model.model.") for k in keys)
    if layout == "sharded":
        assert len(list(folder.glob("model-*.safetensors"))) > 2
        assert (folder / "model.safetensors.index.json").is_file()
    if layout == "in_memory":
        assert any(k.startswith("model.language_model.") for k in keys)
    assert_same_parameters(load_pretrained(folder).state_dict(), reference)


def test_fp16_checkpoint_loads(tmp_path, hf_model):
    folder = make_tiny_checkpoint(tmp_path / "fp16", seed=3, dtype=torch.float16, shard_size="300KB")
    model = load_pretrained(folder, dtype=torch.float32)
    want = hf_model.model.language_model.layers[1].mlp.down_proj.weight.half().float()
    assert torch.equal(model.language_model.layers[1].mlp.down_proj.weight, want)
    assert load_pretrained(folder).dtype == torch.bfloat16  # the CPU default for fp16


def test_mixed_dtype_checkpoint_defaults_by_bytes(tmp_path, hf5, hf_model):
    """fp16 matrices with fp32 norms and biases (more tensors, fewer bytes) count as fp16."""
    folder = copy_checkpoint(hf5, tmp_path)
    edit_weights(folder, lambda sd: sd.update({k: v.half() for k, v in sd.items() if v.dim() > 1}))
    assert checkpoint_dtype(folder) == torch.float16
    model = load_pretrained(folder)
    assert model.dtype == torch.bfloat16
    bias = hf_model.model.multi_modal_projector.linear_1.bias  # stored fp32: rounded once, to bf16
    assert torch.equal(model.projector.linear_1.bias, bias.to(torch.bfloat16))


def test_weights_are_owned_not_mapped(tmp_path, hf5):
    """Editing the checkpoint file in place after loading changes nothing in the model
    (parameters mapped from the file would change, or crash with SIGBUS on truncation)."""
    folder = copy_checkpoint(hf5, tmp_path)
    model = load_pretrained(folder)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    f = folder / "model.safetensors"
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.seek(size // 2)
        fh.write(b"\x7f" * (size - size // 2))  # overwrite the second half of the data
    assert_same_parameters(model.state_dict(), before)


# --- broken checkpoints ------------------------------------------------------------------------


def copy_checkpoint(src, tmp_path, name="ckpt"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def snapshot(folder):
    """Every file under folder with its size and mtime: a load must leave it exactly so."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def edit_weights(folder, fn):
    f = folder / "model.safetensors"
    sd = load_file(str(f))
    fn(sd)
    save_file(sd, str(f), metadata={"format": "pt"})


def edit_config(folder, fn):
    f = folder / "config.json"
    d = json.loads(f.read_text())
    fn(d)
    f.write_text(json.dumps(d))


def expect_error(folder, error, *fragments, **kwargs):
    """Load, expecting `error` whose message holds every fragment; nothing in folder may change."""
    before = snapshot(folder)
    with pytest.raises(error) as info:
        load_pretrained(folder, **kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"
    assert snapshot(folder) == before
    return message


def test_missing_tensor(tmp_path, hf5):
    folder = copy_checkpoint(hf5, tmp_path)
    edit_weights(folder, lambda sd: sd.pop("multi_modal_projector.linear_2.bias"))
    msg = expect_error(folder, CheckpointError, str(folder), "1 missing", "projector.linear_2.bias")
    assert "unexpected" not in msg and "mismatch" not in msg


def test_missing_third_of_packed_qkv_names_the_checkpoint_key(tmp_path, hf5):
    folder = copy_checkpoint(hf5, tmp_path)
    edit_weights(folder, lambda sd: sd.pop("vision_tower.encoder.layers.1.self_attn.v_proj.bias"))
    expect_error(folder, CheckpointError, "1 missing", "vision_tower.encoder.layers.1.self_attn.v_proj.bias",
                 "resblocks.1.attn.in_proj_bias")


def test_wrong_shape(tmp_path, hf5):
    folder = copy_checkpoint(hf5, tmp_path)
    edit_weights(folder, lambda sd: sd.__setitem__("language_model.model.norm.weight", torch.ones(63)))
    msg = expect_error(folder, CheckpointError, "1 shape mismatch", "language_model.model.norm.weight",
                       "model.safetensors", "[63]", "[64]")
    assert "missing" not in msg  # a mis-shaped tensor is reported once, not also as missing


def test_extra_key(tmp_path, hf5):
    folder = copy_checkpoint(hf5, tmp_path)
    edit_weights(folder, lambda sd: sd.__setitem__("vision_tower.encoder.layers.9.mlp.fc1.weight", torch.ones(2)))
    expect_error(folder, CheckpointError, "1 unexpected", "vision_tower.encoder.layers.9.mlp.fc1.weight",
                 "(in model.safetensors)")


def test_truncated_file(tmp_path, hf5):
    folder = copy_checkpoint(hf5, tmp_path)
    f = folder / "model.safetensors"
    size = f.stat().st_size
    os.truncate(f, size - 1000)
    expect_error(folder, CheckpointError, str(f), "truncated", str(size - 1000), str(size))


@pytest.mark.parametrize("junk", [b"", os.urandom(4096), b"PK\x03\x04 not a safetensors file"])
def test_not_a_safetensors_file(tmp_path, hf5, junk):
    folder = copy_checkpoint(hf5, tmp_path)
    (folder / "model.safetensors").write_bytes(junk)
    expect_error(folder, CheckpointError, str(folder / "model.safetensors"), "not a readable safetensors file")


def test_index_names_a_missing_shard(tmp_path, sharded):
    folder = copy_checkpoint(sharded, tmp_path)
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    expect_error(folder, CheckpointError, "model.safetensors.index.json", str(shard))


def test_same_key_in_two_shards(tmp_path, sharded):
    folder = copy_checkpoint(sharded, tmp_path)
    first, second = sorted(folder.glob("model-*.safetensors"))[:2]
    a, b = load_file(str(first)), load_file(str(second))
    key = next(iter(a))
    save_file({**b, key: a[key]}, str(second), metadata={"format": "pt"})
    expect_error(folder, CheckpointError, "1 unexpected", key, second.name, "second source")


def test_missing_config(tmp_path, hf5):
    folder = copy_checkpoint(hf5, tmp_path)
    (folder / "config.json").unlink()
    expect_error(folder, FileNotFoundError, str(folder / "config.json"))


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        load_pretrained(tmp_path / "no_such_folder")


def test_no_weights(tmp_path, hf5):
    folder = copy_checkpoint(hf5, tmp_path)
    (folder / "model.safetensors").unlink()
    expect_error(folder, CheckpointError, str(folder), "model.safetensors")


def test_pickle_only_checkpoint_needs_consent(tmp_path, hf5, reference):
    folder = copy_checkpoint(hf5, tmp_path)
    f = folder / "model.safetensors"
    torch.save(load_file(str(f)), folder / "pytorch_model.bin")
    f.unlink()
    expect_error(folder, CheckpointError, "pytorch_model.bin", "allow_pickle=True")
    before = snapshot(folder)
    assert_same_parameters(load_pretrained(folder, allow_pickle=True).state_dict(), reference)
    assert snapshot(folder) == before


def test_all_problems_in_one_capped_report(tmp_path, hf5):
    """Missing, unexpected and mis-shaped listed together, each capped at 20 lines."""
    folder = copy_checkpoint(hf5, tmp_path)

    def wreck(sd):
        for k in [k for k in sd if k.startswith("language_model.")]:  # 21 decoder tensors renamed
            sd["renamed." + k] = sd.pop(k)
        for k in [k for k in sd if k.startswith("vision_tower.encoder.")]:  # 48 tensors mis-shaped
            sd[k] = torch.zeros(1)
    edit_weights(folder, wreck)
    msg = expect_error(folder, CheckpointError, "21 missing", "21 unexpected", "48 shape mismatches",
                       "renamed.language_model.model.embed_tokens.weight")
    lines = msg.splitlines()
    assert [line.strip() for line in lines if "more" in line] == ["... and 1 more", "... and 1 more",
                                                                  "... and 28 more"]
    assert len(lines) == 1 + 3 * (1 + 20 + 1)


# --- config.json -------------------------------------------------------------------------------

BAD_CONFIGS = {
    "text_config.hidden_act": lambda d: d["text_config"].update(hidden_act="gelu"),
    "projector_hidden_act": lambda d: d.update(projector_hidden_act="relu"),
    "vision_feature_select_strategy": lambda d: d.update(vision_feature_select_strategy="foo"),
    "image_seq_length": lambda d: d.update(image_seq_length=100),
    "vision_feature_layer": lambda d: d.update(vision_feature_layer=-7),
    "vision_config.hidden_act": lambda d: d["vision_config"].update(hidden_act="relu"),
    "text_config.model_type": lambda d: d["text_config"].update(model_type="qwen2"),  # mistral: test_mistral.py
    "text_config.attention_bias": lambda d: d["text_config"].update(attention_bias=True),
    "text_config.rope_scaling": lambda d: d["text_config"].update(
        rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0}),
    "text_config.frobnicate": lambda d: d["text_config"].update(frobnicate=3),
    "model_type": lambda d: d.update(model_type="llava_onevision"),  # llava_next: test_llava_next.py
}


@pytest.mark.parametrize("field", list(BAD_CONFIGS))
def test_unsupported_config_field(tmp_path, hf5, field):
    folder = copy_checkpoint(hf5, tmp_path)
    edit_config(folder, BAD_CONFIGS[field])
    expect_error(folder, ConfigError, str(folder / "config.json"), field)


def test_config_not_json(tmp_path, hf5):
    folder = copy_checkpoint(hf5, tmp_path)
    (folder / "config.json").write_text("{\"model_type\": ")
    expect_error(folder, ConfigError, "config.json", "not valid JSON")


# The real llava-hf/llava-1.5-7b-hf config.json: written by transformers 4.36, it omits every
# field equal to the class default (text_config names no size at all).
LLAVA_15_7B = {
    "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
    "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
    "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                    "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                    "torch_dtype": "float16", "vocab_size": 32064},
    "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                      "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                      "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064,
}
SPARSE_CONFIGS = {
    "llava-1.5-7b": LLAVA_15_7B,
    "13b-sized": {**LLAVA_15_7B, "text_config": {
        **LLAVA_15_7B["text_config"], "hidden_size": 5120, "intermediate_size": 13824,
        "num_attention_heads": 40, "num_hidden_layers": 40, "num_key_value_heads": 40}},
    "no-vision-config": {k: v for k, v in LLAVA_15_7B.items() if k != "vision_config"},
    "no-text-config": {k: v for k, v in LLAVA_15_7B.items() if k not in ("text_config", "vocab_size")},
    "old-rope-scaling": {**LLAVA_15_7B, "text_config": {
        **LLAVA_15_7B["text_config"], "rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 2.0}}},
    "gqa-tied-top-level": {**LLAVA_15_7B, "tie_word_embeddings": True, "vision_feature_layer": [-2, -5],
                           "text_config": {**LLAVA_15_7B["text_config"], "num_key_value_heads": 8}},
    "tied-top-level-not-text": {**LLAVA_15_7B, "tie_word_embeddings": True,
                                "text_config": {**LLAVA_15_7B["text_config"], "tie_word_embeddings": False}},
}


def hf_fields(h) -> dict:
    """What transformers' LlavaConfig reads, in our field names."""
    v, t = h.vision_config, h.text_config
    rope = {("rope_type" if k == "type" else k): v for k, v in (t.rope_parameters or {}).items()}
    theta = rope.pop("rope_theta", 10000.0)
    scaling = None if rope.get("rope_type", "default") == "default" else rope
    return dict(
        vision=dict(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                    num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
                    image_size=v.image_size, patch_size=v.patch_size, num_channels=v.num_channels,
                    hidden_act=v.hidden_act, layer_norm_eps=v.layer_norm_eps),
        text=dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                  num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                  num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim,
                  max_position_embeddings=t.max_position_embeddings, rms_norm_eps=t.rms_norm_eps,
                  rope_theta=theta, rope_scaling=scaling, tie_word_embeddings=h.tie_word_embeddings,
                  bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id,
                  pad_token_id=t.pad_token_id if t.pad_token_id is not None else getattr(h, "pad_token_id", None),
                  sliding_window=getattr(t, "sliding_window", None)),  # LlamaConfig has none
        projector=dict(bias=h.multimodal_projector_bias, act=h.projector_hidden_act),
        image_token_index=h.image_token_index, vision_feature_layer=h.vision_feature_layer,
        vision_feature_select_strategy=h.vision_feature_select_strategy)


def our_fields(o: LlavaConfig) -> dict:
    scaling = o.text.rope_scaling and {("rope_type" if k == "type" else k): v for k, v in o.text.rope_scaling.items()}
    text = {k: getattr(o.text, k) for k in o.text.__dataclass_fields__}
    return dict(
        vision={k: getattr(o.vision, k) for k in o.vision.__dataclass_fields__},
        text={**text, "rope_scaling": scaling},
        projector=dict(bias=o.projector.bias, act="gelu"),
        image_token_index=o.image_token_index, vision_feature_layer=o.vision_feature_layer,
        vision_feature_select_strategy=o.vision_feature_select_strategy)


@pytest.mark.parametrize("name", list(SPARSE_CONFIGS))
def test_sparse_hub_config_reads_as_transformers_reads_it(tmp_path, name):
    from transformers import LlavaConfig as HFLlavaConfig

    (tmp_path / "config.json").write_text(json.dumps(SPARSE_CONFIGS[name]))
    ours = LlavaConfig.from_json(tmp_path)
    theirs = HFLlavaConfig.from_pretrained(tmp_path)
    assert our_fields(ours) == hf_fields(theirs)
    assert ours.num_image_tokens == 576


def test_transformers5_saved_config_reads_as_transformers_reads_it(hf5):
    from transformers import LlavaConfig as HFLlavaConfig
    assert our_fields(LlavaConfig.from_json(hf5)) == hf_fields(HFLlavaConfig.from_pretrained(hf5))


def test_llava_15_7b_config_values():
    """The numbers every LLaVA-1.5-7B user relies on, spelled out."""
    cfg = LlavaConfig.from_hf_dict(LLAVA_15_7B)
    assert (cfg.vision.hidden_size, cfg.vision.num_hidden_layers, cfg.vision.image_size) == (1024, 24, 336)
    assert (cfg.text.hidden_size, cfg.text.num_hidden_layers, cfg.text.num_key_value_heads) == (4096, 32, 32)
    assert (cfg.text.vocab_size, cfg.text.max_position_embeddings, cfg.text.rope_theta) == (32064, 4096, 10000.0)
    assert (cfg.image_token_index, cfg.text.pad_token_id, cfg.num_image_tokens) == (32000, 32001, 576)


def test_full_strategy_config_as_transformers_writes_it_is_accepted():
    """transformers writes image_seq_length=576 under 'full' too (577 tokens); that file must load."""
    from transformers import CLIPVisionConfig, LlamaConfig
    from transformers import LlavaConfig as HFLlavaConfig

    from llava_core.model.config import LlavaConfig

    hf = HFLlavaConfig(vision_config=CLIPVisionConfig(image_size=336, patch_size=14),
                       text_config=LlamaConfig(), vision_feature_select_strategy="full")
    d = hf.to_dict()
    assert d["image_seq_length"] == 576
    cfg = LlavaConfig.from_hf_dict(d)
    assert cfg.num_image_tokens == 577
    d["image_seq_length"] = 300
    with pytest.raises(ConfigError, match="image_seq_length=300"):
        LlavaConfig.from_hf_dict(d)
