"""`llava-core convert`: a tiny original-layout LLaVA checkpoint + a tiny CLIP folder -> llava-hf.

The oracles: transformers' LlavaForConditionalGeneration on the converted folder (against our
loader), and the SOURCE tensors themselves, run through transformers' LlamaForCausalLM and
CLIPVisionModel plus the source projector (against the converted model). Key names are checked
against the real liuhaotian/llava-v1.5-7b index in shared/real.
"""

import json
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from llava_core.checkpoints import convert_original as conv
from llava_core.checkpoints.convert_original import ConversionError, convert_original
from llava_core.checkpoints.loader import load_pretrained
from llava_core.cli.main import main as cli_main
from llava_core.model.config import LLAVA_DEFAULT_VISION, LlavaConfig
from llava_core.model.processor import LlavaProcessor
from llava_core.testing import make_tokenizer

REAL = Path(os.environ.get("LLAVA_CORE_SHARED", Path(__file__).resolve().parents[1].parent / "shared")) / "real"
TOL = 1e-5  # fp32, same weights, different code paths
PIXEL_TOL = 1e-6
VOCAB = 400  # the source tokenizer's size; converted: <image> 400, <pad> 401, rows padded to 448

# The fields of the real liuhaotian/llava-v1.5-7b config.json, sizes shrunk (checked against
# the real file's key set in test_original_config_fields_are_the_real_ones).
ORIGINAL_CONFIG = {
    "_name_or_path": "llava-v1.5-tiny", "architectures": ["LlavaLlamaForCausalLM"], "bos_token_id": 1,
    "eos_token_id": 2, "freeze_mm_mlp_adapter": False, "freeze_mm_vision_resampler": False,
    "hidden_act": "silu", "hidden_size": 64, "image_aspect_ratio": "pad", "initializer_range": 0.02,
    "intermediate_size": 128, "max_length": 4096, "max_position_embeddings": 4096, "mm_hidden_size": 32,
    "mm_projector_type": "mlp2x_gelu", "mm_resampler_type": None, "mm_use_im_patch_token": False,
    "mm_use_im_start_end": False, "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
    "mm_vision_tower": "openai/clip-vit-large-patch14-336", "model_type": "llava", "num_attention_heads": 4,
    "num_hidden_layers": 2, "num_key_value_heads": 2, "pad_token_id": 0, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "float32",
    "transformers_version": "4.31.0", "tune_mm_mlp_adapter": False, "tune_mm_vision_resampler": False,
    "unfreeze_mm_vision_tower": False, "use_cache": True, "use_mm_proj": True, "vocab_size": VOCAB,
}
CLIP_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                   image_size=336, patch_size=14, projection_dim=32)
# openai/clip-vit-large-patch14-336's preprocessor_config.json format (sizes as ints)
CLIP_PREPROCESSOR = {"crop_size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                     "feature_extractor_type": "CLIPFeatureExtractor",
                     "image_mean": [0.48145466, 0.4578275, 0.40821073],
                     "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 336}


def real(name: str) -> Path:
    path = REAL / name
    if not path.is_dir():
        pytest.skip(f"{path} is absent (set LLAVA_CORE_SHARED to the folder holding real/)")
    return path


def collapse(keys) -> set[str]:
    return {re.sub(r"\.\d+\.", ".N.", k) for k in keys}


def source_tensors(seed: int = 0) -> tuple[dict[str, torch.Tensor], "LlamaForCausalLM"]:
    """The original checkpoint's state dict: a tiny vicuna (transformers' LlamaForCausalLM, whose
    names are the original's) + mm_projector (Linear, GELU, Linear) + the per-layer inv_freq buffers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = ORIGINAL_CONFIG
    torch.manual_seed(seed)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c["num_key_value_heads"], max_position_embeddings=c["max_position_embeddings"],
        rms_norm_eps=c["rms_norm_eps"], bos_token_id=1, eos_token_id=2)).eval()
    sd = {k: v.clone() for k, v in llama.state_dict().items()}
    head_dim = c["hidden_size"] // c["num_attention_heads"]
    for i in range(c["num_hidden_layers"]):  # transformers 4.31 saved this buffer per layer
        sd[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = 1 / 10000 ** (torch.arange(0, head_dim, 2) / head_dim)
    h, v = c["hidden_size"], c["mm_hidden_size"]
    sd["model.mm_projector.0.weight"] = torch.randn(h, v) * 0.1
    sd["model.mm_projector.0.bias"] = torch.randn(h) * 0.1
    sd["model.mm_projector.2.weight"] = torch.randn(h, h) * 0.1
    sd["model.mm_projector.2.bias"] = torch.randn(h) * 0.1
    return sd, llama


def write_original(folder: Path, sd: dict, fmt: str = "safetensors", config: dict | None = None) -> Path:
    """Two shards and an index, as the original repo saves (decoder first, lm_head + projector last)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    make_tokenizer(folder, vocab=VOCAB, llava_tokens=False)
    (folder / "config.json").write_text(json.dumps(config or ORIGINAL_CONFIG, indent=2))
    last = {k for k in sd if k.startswith(("lm_head.", "model.mm_projector.", "model.norm."))}
    shards = [{k: v for k, v in sd.items() if k not in last}, {k: v for k, v in sd.items() if k in last}]
    ext, index = ("safetensors", "model.safetensors.index.json") if fmt == "safetensors" else \
        ("bin", "pytorch_model.bin.index.json")
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"{stem}-{i:05d}-of-{len(shards):05d}.{ext}"
        if fmt == "safetensors":
            save_file({k: v.contiguous() for k, v in shard.items()}, str(folder / name), metadata={"format": "pt"})
        else:
            torch.save(shard, folder / name)
        weight_map.update({k: name for k in shard})
    (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def write_clip(folder: Path, layout: str = "hub", seed: int = 1) -> Path:
    """A CLIPVisionModel folder; layout "hub" renames its weights to `vision_model.*` as the openai
    folders on the hub store them, "hf5" keeps transformers 5's own names."""
    from safetensors.torch import load_file, save_file
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    if layout == "clipmodel":  # the whole CLIP (text tower too), as the openai folders are
        text = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              vocab_size=99, projection_dim=32)
        CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=CLIP_VISION, projection_dim=32)
                  ).save_pretrained(str(folder))
    else:
        CLIPVisionModel(CLIPVisionConfig(**CLIP_VISION)).save_pretrained(str(folder))
    if layout == "hub":
        f = folder / "model.safetensors"
        sd = {"vision_model." + k: v for k, v in load_file(str(f)).items()}  # transformers 5 writes bare names
        save_file(sd, str(f), metadata={"format": "pt"})
    (folder / "preprocessor_config.json").write_text(json.dumps(CLIP_PREPROCESSOR))
    return folder


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("orig")
    sd, llama = source_tensors()
    src = write_original(root / "llava-v1.5-tiny", sd)
    clip = write_clip(root / "clip")
    return sd, llama, src, clip


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
    _, _, src, clip = source
    return convert_original(src, tmp_path_factory.mktemp("out") / "llava-hf", clip, dtype=torch.float32)


def noise_image(w, h, seed=0):
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(a)


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


# --- the converted model answers as the source tensors do -------------------------------------

def test_converted_folder_loads_in_transformers_and_ours_with_equal_logits(converted):
    from transformers import LlavaForConditionalGeneration

    hf = LlavaForConditionalGeneration.from_pretrained(converted, dtype=torch.float32).eval()
    ours = load_pretrained(converted)
    proc = LlavaProcessor.from_pretrained(converted)
    assert (ours.cfg.image_token_index, ours.cfg.text.pad_token_id, ours.cfg.text.vocab_size) == (400, 401, 448)
    batch = proc([proc.prompt("What is in the image?")], [noise_image(500, 375)])
    assert (batch["input_ids"] == 400).sum() == 576
    with torch.no_grad():
        ref = hf(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
        out = ours(batch["input_ids"], batch["pixel_values"])
    assert out.shape == ref.shape == (1, batch["input_ids"].shape[1], 448)
    assert max_diff(out, ref) <= TOL


def test_text_logits_equal_the_source_llama_over_the_original_vocab(source, converted):
    from transformers import LlavaForConditionalGeneration

    _, llama, src, _ = source
    ids = torch.randint(3, VOCAB, (2, 17), generator=torch.Generator().manual_seed(0))
    hf = LlavaForConditionalGeneration.from_pretrained(converted, dtype=torch.float32).eval()
    ours = load_pretrained(converted)
    with torch.no_grad():
        want = llama(input_ids=ids).logits  # (2, 17, 400)
        theirs = hf(input_ids=ids).logits
        mine = ours(ids)
    assert max_diff(theirs[..., :VOCAB], want) <= TOL
    assert max_diff(mine[..., :VOCAB], want) <= TOL
    # the new rows are the mean of the old ones: their logit is the mean logit, never the winner
    emb = ours.language_model.embed_tokens.weight
    assert torch.equal(emb[:VOCAB], llama.model.embed_tokens.weight)
    assert max_diff(emb[VOCAB:], llama.model.embed_tokens.weight.mean(0).expand(48, -1)) <= 1e-7
    assert max_diff(mine[..., VOCAB:], want.mean(-1, keepdim=True).expand(-1, -1, 48)) <= TOL
    # the tokenizer keeps every existing id
    from transformers import AutoTokenizer
    text = "USER: What is the total? The total is 42.50 dollars. ASSISTANT:"
    assert AutoTokenizer.from_pretrained(converted)(text)["input_ids"] == \
        AutoTokenizer.from_pretrained(src)(text)["input_ids"]


def test_image_features_equal_clip_plus_the_source_projector(source, converted):
    from transformers import CLIPVisionModel

    sd, _, _, clip = source
    px = torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(3))
    tower = CLIPVisionModel.from_pretrained(clip, dtype=torch.float32).eval()
    with torch.no_grad():
        feats = tower(pixel_values=px, output_hidden_states=True).hidden_states[-2][:, 1:]  # (2, 576, 32), no CLS
        h = torch.nn.functional.linear(feats, sd["model.mm_projector.0.weight"], sd["model.mm_projector.0.bias"])
        want = torch.nn.functional.linear(torch.nn.functional.gelu(h), sd["model.mm_projector.2.weight"],
                                          sd["model.mm_projector.2.bias"])  # (2, 576, 64)
        got = load_pretrained(converted).image_features(px)
    assert got.shape == want.shape == (2, 576, 64)
    assert max_diff(got, want) <= TOL


def test_processor_pads_to_square_and_uses_vicuna_v1_like_transformers(converted):
    from transformers import AutoProcessor

    ours = LlavaProcessor.from_pretrained(converted)
    assert ours.image_aspect_ratio == "pad" and ours.template == "checkpoint"
    theirs = AutoProcessor.from_pretrained(converted, backend="pil")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A square."}]},
                {"role": "user", "content": [{"type": "text", "text": "Which colour?"}]}]
    prompt = ours.apply_chat_template(messages)
    vicuna = LlavaProcessor.from_pretrained(converted, template="vicuna_v1").apply_chat_template(messages)
    assert prompt == vicuna == theirs.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt.startswith("A chat between")
    assert "USER: <image>\nWhat is this? ASSISTANT: A square.</s>USER: Which colour? ASSISTANT:" in prompt
    for wh in [(500, 375), (100, 300), (336, 336)]:
        image = noise_image(*wh, seed=wh[0])
        mine = ours(prompt, [image])
        ref = theirs(text=prompt, images=image, return_tensors="pt")
        assert torch.equal(mine["input_ids"], ref["input_ids"])
        assert max_diff(mine["pixel_values"], ref["pixel_values"]) <= PIXEL_TOL
    # a wide image really is padded: the top row is the mean colour, not the picture
    px = ours.preprocess(Image.new("RGB", (400, 200), (255, 0, 0)))
    assert px[0, 0, 0, 0] != px[0, 0, 168, 168]


# --- key names, against the real original index ------------------------------------------------

def test_source_keys_are_the_real_index_keys(source):
    index = json.loads((real("liuhaotian-llava-v1.5-7b") / "pytorch_model.bin.index.json").read_text())
    sd = source[0]
    assert collapse(sd) == collapse(index["weight_map"])
    table = conv.key_table("mlp2x_gelu")
    unhandled = [k for k in index["weight_map"] if not conv.DROPPED.search(k) and conv.rename(k, table) is None]
    assert unhandled == []


def test_original_config_fields_are_the_real_ones():
    d = json.loads((real("liuhaotian-llava-v1.5-7b") / "config.json").read_text())
    assert set(ORIGINAL_CONFIG) == set(d)


def test_real_original_config_converts_to_the_real_llava_hf_config():
    original = json.loads((real("liuhaotian-llava-v1.5-7b") / "config.json").read_text())
    want = LlavaConfig.from_json(real("llava-1.5-7b-hf"))
    clip = dict(LLAVA_DEFAULT_VISION, patch_size=14, hidden_act="quick_gelu", model_type="clip_vision_model")
    got, pad = conv.convert_config(original, clip, n_tokens=32000)
    assert pad
    assert got == want  # every field of the vision, text and projector dataclasses, tokens, layer, strategy
    from llava_core.checkpoints.export import llava_hf_config
    back = LlavaConfig.from_hf_dict(llava_hf_config(got))  # what convert writes reads back the same
    assert (back.image_seq_length, replace(back, image_seq_length=None)) == (576, want)


# --- the destination ---------------------------------------------------------------------------

def test_existing_destination_needs_force(source, tmp_path):
    _, _, src, clip = source
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="--force"):
        convert_original(src, dst, clip, dtype=torch.float32)
    assert (dst / "config.json").read_text() == "{}"
    assert cli_main(["convert", str(src), str(dst), "--vision-tower", str(clip), "--dtype", "float32"]) == 1
    assert cli_main(["convert", str(src), str(dst), "--vision-tower", str(clip), "--dtype", "float32", "--force"]) == 0
    assert LlavaConfig.from_json(dst).text.vocab_size == 448
    assert [p.name for p in tmp_path.iterdir()] == ["dst"]  # no temp or moved-aside folder left


def test_interrupted_conversion_leaves_no_destination_and_no_temp_folder(source, tmp_path, monkeypatch):
    _, _, src, clip = source
    calls = []
    real_save = conv._save_shard

    def failing(tensors, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        real_save(tensors, path)

    monkeypatch.setattr(conv, "_save_shard", failing)
    with pytest.raises(OSError, match="simulated"):
        convert_original(src, tmp_path / "dst", clip, dtype=torch.float32)
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []


def test_destination_may_not_be_the_source(source):
    _, _, src, clip = source
    with pytest.raises(ConversionError, match="would replace the original LLaVA checkpoint"):
        convert_original(src, src, clip, overwrite=True)


# --- pickle, and errors that name the thing at fault ------------------------------------------

def test_bin_needs_trust_pickle_and_then_converts_identically(source, converted, tmp_path):
    from safetensors.torch import load_file

    sd, _, _, clip = source
    src = write_original(tmp_path / "bin", sd, fmt="bin")
    with pytest.raises(ConversionError, match=r"pytorch_model-00001-of-00002\.bin.*--trust-pickle"):
        convert_original(src, tmp_path / "out", clip)
    assert not (tmp_path / "out").exists()
    # the command: one line on stderr, exit status 1
    assert cli_main(["convert", str(src), str(tmp_path / "out"), "--vision-tower", str(clip)]) == 1
    assert cli_main(["convert", str(src), str(tmp_path / "out"), "--vision-tower", str(clip),
                     "--trust-pickle", "--dtype", "float32"]) == 0

    def tensors(folder):
        return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    a, b = tensors(tmp_path / "out"), tensors(converted)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_default_dtype_is_float16_and_loads(source, tmp_path):
    _, _, src, clip = source
    assert cli_main(["convert", str(src), str(tmp_path / "fp16"), "--vision-tower", str(clip)]) == 0
    assert json.loads((tmp_path / "fp16" / "config.json").read_text())["torch_dtype"] == "float16"
    model = load_pretrained(tmp_path / "fp16", dtype=torch.float32)
    assert model.language_model.embed_tokens.weight.shape == (448, 64)


def test_missing_projector_key_is_named(source, tmp_path):
    sd, _, _, clip = source
    partial = {k: v for k, v in sd.items() if k != "model.mm_projector.2.weight"}
    src = write_original(tmp_path / "partial", partial)
    with pytest.raises(ConversionError, match=r"1 missing:\n\s+model\.mm_projector\.2\.weight "
                                              r"\(-> multi_modal_projector\.linear_2\.weight\)"):
        convert_original(src, tmp_path / "out", clip)
    assert not (tmp_path / "out").exists()


def test_projector_shape_mismatch_names_key_and_shapes(source, tmp_path):
    sd, _, _, clip = source
    bad = dict(sd, **{"model.mm_projector.0.weight": torch.zeros(64, 48)})
    src = write_original(tmp_path / "bad", bad)
    with pytest.raises(ConversionError, match=r"model\.mm_projector\.0\.weight \(in .*\): shape \[64, 48\], "
                                              r"expected \[64, 32\]"):
        convert_original(src, tmp_path / "out", clip)


def test_vision_folder_that_is_not_clip_is_named(source, tmp_path):
    _, _, src, clip = source
    other = tmp_path / "siglip"
    shutil.copytree(clip, other)
    d = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(dict(d, model_type="siglip_vision_model")))
    with pytest.raises(ConversionError, match=r"siglip/config.json: model_type='siglip_vision_model', not a CLIP"):
        convert_original(src, tmp_path / "out", other)


@pytest.mark.parametrize("field,value,needle", [
    ("mm_projector_type", "qformer", "mm_projector_type='qformer'"),
    ("mm_use_im_start_end", True, "mm_use_im_start_end=True"),
    ("image_aspect_ratio", "anyres", "image_aspect_ratio='anyres'"),
    ("mm_hidden_size", 1024, "mm_hidden_size=1024 but the CLIP vision tower's hidden_size is 32"),
    ("model_type", "llava_mistral", "model_type='llava_mistral'"),
])
def test_unsupported_original_config_is_named(source, tmp_path, field, value, needle):
    sd, _, _, clip = source
    src = tmp_path / "src"
    write_original(src, {}, config=dict(ORIGINAL_CONFIG, **{field: value}))
    with pytest.raises(ConversionError, match=re.escape(needle)):
        convert_original(src, tmp_path / "out", clip)


@pytest.mark.parametrize("layout", ["hf5", "clipmodel"])
def test_other_clip_layouts_convert_the_vision_tower(source, converted, tmp_path, layout):
    """transformers 5's CLIPVisionModel names (no vision_model.), and a whole CLIPModel (text tower dropped)."""
    from safetensors.torch import load_file
    from transformers import CLIPVisionModel

    _, _, src, _ = source
    clip = write_clip(tmp_path / "clip", layout=layout, seed=1 if layout == "hf5" else 5)
    out = convert_original(src, tmp_path / "out", clip, dtype=torch.float32)
    shard = sorted(out.glob("*.safetensors"))[-1]  # the tower's shard
    got = load_file(str(shard))
    assert all(k.startswith("vision_tower.vision_model.") for k in got)
    if layout == "hf5":  # same seed as the fixture's tower: the very same tensors
        ref = {k: v for f in converted.glob("*.safetensors") for k, v in load_file(str(f)).items()}
        assert all(torch.equal(v, ref[k]) for k, v in got.items())
    px = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(4))
    tower = CLIPVisionModel.from_pretrained(clip, dtype=torch.float32).eval()
    with torch.no_grad():
        want = tower(pixel_values=px, output_hidden_states=True).hidden_states[-2][:, 1:]  # (1, 576, 32)
        assert max_diff(load_pretrained(out).vision_tower(px), want) <= TOL
