"""A llama.cpp GGUF file -> LlamaDecoder, strictly (the default model's decoder is one:
SmolLM2-135M-Instruct, Q4_1, found by default/smollm2.py).

Weights are dequantised to float by the `gguf` package (llama.cpp's own Python code) and
copied into our decoder. Two things differ from a transformers checkpoint:
  * GGUF lists dimensions fastest-first (ne0, ne1), so a (out, in) matrix reads as [in, out];
    the reader's numpy arrays are already (out, in).
  * llama.cpp rotates adjacent pairs (x[2i], x[2i+1]) where we `rotate_half` (x[i], x[i+D/2]),
    so its convert script reorders the rows of each q/k head; `unpermute_rows` undoes that.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from pathlib import Path

import numpy as np
import torch

from ..model.config import ConfigError, TextConfig
from ..model.llama import LlamaDecoder, Rotary
from .loader import CheckpointError

log = logging.getLogger(__name__)

class GGUFIntegrityError(CheckpointError):
    """A GGUF file whose sha256 is not the one recorded for it."""


def verify_sha256(path: Path, expected: str) -> None:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    actual = h.hexdigest()
    if actual != expected:
        raise GGUFIntegrityError(f"{path}: sha256 {actual} differs from the recorded {expected}: the file "
                                 "is altered or truncated (to load some other GGUF file, pass sha256=None)")


def _checked(path: str | Path, sha256: str | None) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    if sha256 is not None:
        verify_sha256(path, sha256)
    return path


# --- reading ------------------------------------------------------------------------

def open_gguf(path: Path):
    """llama.cpp's GGUFReader over the file (memory-mapped); a file it cannot parse is a CheckpointError."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ModuleNotFoundError("reading GGUF files needs the gguf package: pip install gguf==0.19.0") from None

    class PlainReader(GGUFReader):
        """GGUFReader slicing a plain ndarray view of its memory map: numpy.memmap's per-slice
        bookkeeping makes parsing the 98k vocabulary and merge strings take 2-3x longer."""

        def _get(self, *args, **kwargs):
            if type(self.data) is np.memmap:
                self.data = self.data.view(np.ndarray)  # same mapped bytes, read-only
            return super()._get(*args, **kwargs)

    try:
        return PlainReader(path)
    except (ValueError, KeyError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None


def _field(reader, key: str, source: Path, default=...):
    f = reader.fields.get(key)
    if f is None:
        if default is ...:
            raise ConfigError(f"{source}: GGUF metadata lacks {key!r}")
        return default
    return f.contents()


def _f32(x) -> float:
    """A float32 metadata value as its shortest decimal: 1e-05, not 9.999999747378752e-06."""
    return float(str(np.float32(x)))


def text_config_from_gguf(reader, source: Path) -> TextConfig:
    """TextConfig from the `llama.*` and `tokenizer.ggml.*` metadata of a GGUF file."""
    arch = _field(reader, "general.architecture", source)
    if arch != "llama":
        raise ConfigError(f"{source}: general.architecture={arch!r} is not supported (llama)")
    a = lambda key, default=...: _field(reader, f"llama.{key}", source, default)  # noqa: E731
    n_heads = a("attention.head_count")
    hidden = a("embedding_length")
    head_dim = a("attention.key_length", hidden // n_heads)
    if a("rope.dimension_count", head_dim) != head_dim:
        raise ConfigError(f"{source}: llama.rope.dimension_count={a('rope.dimension_count')} rotates part "
                          f"of each {head_dim}-wide head; our decoder rotates all of it")
    scaling = a("rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise ConfigError(f"{source}: llama.rope.scaling.type={scaling!r} is not supported (none, linear)")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ConfigError(f"{source}: GGUF metadata lacks 'tokenizer.ggml.tokens' (the vocabulary)")
    vocab = len(tokens.data)  # one index per token string; the strings are not decoded
    if a("vocab_size", vocab) != vocab:
        raise ConfigError(f"{source}: llama.vocab_size={a('vocab_size')} but the token list holds {vocab}")
    t = lambda key: _field(reader, f"tokenizer.ggml.{key}", source, None)  # noqa: E731
    return TextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=a("feed_forward_length"),
        num_hidden_layers=a("block_count"),
        num_attention_heads=n_heads,
        num_key_value_heads=a("attention.head_count_kv", n_heads),
        head_dim=head_dim,
        max_position_embeddings=a("context_length"),
        rms_norm_eps=_f32(a("attention.layer_norm_rms_epsilon")),
        rope_theta=_f32(a("rope.freq_base", 10000.0)),
        rope_scaling=None if scaling == "none" else {"rope_type": "linear",
                                                     "factor": a("rope.scaling.factor")},
        tie_word_embeddings=all(x.name != "output.weight" for x in reader.tensors),
        bos_token_id=t("bos_token_id"),
        eos_token_id=t("eos_token_id"),
        pad_token_id=t("padding_token_id"),
    )


# GGUF tensor name -> LlamaDecoder parameter name; the first rule that matches applies.
GGUF_KEY_RULES: list[tuple[str, str]] = [
    (r"token_embd\.weight", "embed_tokens.weight"),
    (r"output_norm\.weight", "norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", r"layers.\1.input_layernorm.weight"),
    (r"blk\.(\d+)\.attn_q\.weight", r"layers.\1.self_attn.q_proj.weight"),
    (r"blk\.(\d+)\.attn_k\.weight", r"layers.\1.self_attn.k_proj.weight"),
    (r"blk\.(\d+)\.attn_v\.weight", r"layers.\1.self_attn.v_proj.weight"),
    (r"blk\.(\d+)\.attn_output\.weight", r"layers.\1.self_attn.o_proj.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", r"layers.\1.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_gate\.weight", r"layers.\1.mlp.gate_proj.weight"),
    (r"blk\.(\d+)\.ffn_up\.weight", r"layers.\1.mlp.up_proj.weight"),
    (r"blk\.(\d+)\.ffn_down\.weight", r"layers.\1.mlp.down_proj.weight"),
]
_COMPILED = [(re.compile(p), r) for p, r in GGUF_KEY_RULES]


def map_gguf_key(name: str) -> str | None:
    """A GGUF tensor name -> our parameter name (None: no rule knows it)."""
    for pattern, repl in _COMPILED:
        if pattern.fullmatch(name):
            return pattern.sub(repl, name)
    return None


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: within each head, rows (i, i + D/2) were interleaved to (2i, 2i+1).

    convert_hf_to_gguf.py applies w.reshape(H, 2, D/2, C).swapaxes(1, 2); this is its inverse.
    """
    rows, cols = w.shape  # (H*D, C)
    if rows % (2 * n_heads):
        raise CheckpointError(f"cannot split {rows} rows into {n_heads} heads of even width")
    half = rows // n_heads // 2
    # (H, D/2, 2, C) -> (H, 2, D/2, C) -> (H*D, C)
    return w.reshape(n_heads, half, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _dequantize(tensor, cfg: TextConfig, target: str, source: Path) -> np.ndarray:
    from gguf.quants import dequantize

    try:
        w = dequantize(tensor.data, tensor.tensor_type)  # numpy order: (out, in) for a matrix
    except NotImplementedError as e:
        raise CheckpointError(f"{source}: tensor {tensor.name!r}: {e}") from None
    if target.endswith("q_proj.weight"):
        w = unpermute_rows(w, cfg.num_attention_heads)
    elif target.endswith("k_proj.weight"):
        w = unpermute_rows(w, cfg.num_key_value_heads)
    return np.require(w, np.float32, ["C", "W"])  # copies the F32 norms out of the read-only map


def read_gguf_state(reader, cfg: TextConfig, expected: dict[str, tuple], source: Path,
                    dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of the file, dequantised and renamed; one CheckpointError for all that does not fit."""
    jobs, unexpected, mismatched = {}, [], []
    for tensor in reader.tensors:
        target = map_gguf_key(tensor.name)
        if target is None or target not in expected:
            unexpected.append(f"{tensor.name} {tensor.tensor_type.name} {list(tensor.shape)}")
            continue
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF [in, out] -> (out, in)
        if shape != expected[target]:
            mismatched.append(f"{tensor.name}: file {list(shape)}, {target} needs {list(expected[target])}")
            continue
        jobs[target] = tensor
    missing = sorted(set(expected) - set(jobs))
    if missing or unexpected or mismatched:
        lines = [f"{source}: the GGUF tensors do not fit the decoder its metadata describes"]
        for title, items in (("missing from the file", missing), ("unexpected in the file", unexpected),
                             ("shape mismatches", mismatched)):
            if items:
                lines += [f"  {len(items)} {title}:"] + [f"    {x}" for x in items[:20]]
        raise CheckpointError("\n".join(lines))
    return {name: torch.from_numpy(_dequantize(tensor, cfg, name, source)).to(dtype)
            for name, tensor in jobs.items()}


def load_gguf_decoder(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                      sha256: str | None = None) -> tuple[LlamaDecoder, TextConfig]:
    """A LlamaDecoder (lm_head included) and its TextConfig from a llama-architecture GGUF file,
    which must hash to `sha256` if one is given."""
    start = time.perf_counter()
    path = _checked(path, sha256)
    reader = open_gguf(path)
    cfg = text_config_from_gguf(reader, path)
    with torch.device("meta"):
        model = LlamaDecoder(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    state = read_gguf_state(reader, cfg, expected, path, dtype)
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary = Rotary(cfg)  # its buffer was built on the meta device
    model.to(device)
    stray = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert not stray, f"left on the meta device: {stray}"
    log.info("loaded %s: %d tensors as %s in %.1f s", path.name, len(reader.tensors), dtype,
             time.perf_counter() - start)
    return model.eval(), cfg


def load_gguf_tokenizer(path: str | Path, sha256: str | None = None):
    """The tokenizer (and chat template) stored in a GGUF file's metadata, read by transformers.

    AutoTokenizer gives the same tokenizer, but first parses the whole file with the slow legacy
    reader only to learn which class to build (6-15 s); the class it builds reads it in ~0.5 s.
    """
    from transformers import PreTrainedTokenizerFast

    path = _checked(path, sha256)
    return PreTrainedTokenizerFast.from_pretrained(str(path.parent), gguf_file=path.name)
