"""The parts format: what `weights/` holds of a default model (only what was trained here,
<= 25 MB), and its assembly into a complete llava-hf checkpoint.

    config.json                  llava-hf config of the assembled model
    parts.safetensors            vision tower + projector, llava-hf hub key names
    lora/adapter_model.safetensors, lora/adapter_config.json
                                 LoRA A/B keyed by our decoder names (`layers.3.self_attn.q_proj.lora_A.weight`)
    decoder.json                 {"package", "file", "sha256"} of the GGUF decoder
    tokenizer.json, tokenizer_config.json, chat_template.json/.jinja,
    preprocessor_config.json, processor_config.json

`save_parts` writes such a folder from a trained model (default_model.py builds the model).
`assemble` turns it into a complete llava-hf checkpoint: the GGUF decoder dequantised, its
vocabulary extended by `<image>`, each LoRA delta merged (W += alpha/r * B @ A), the vision
parts added. `model_cache.resolve_model("default")` does it once into a cache folder named by
a hash of the parts and reuses it after.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from ..atomic import atomic_folder, write_json
from ..checkpoints.export import (hub_state_dict, llava_hf_config, write_llava_hf, write_processor_files,
                                  write_safetensors)
from ..checkpoints.keymap import map_key, qkv_rows
from ..checkpoints.loader import CheckpointError
from ..checkpoints.lora import lora_deltas, lora_settings, normalize_lora_state
from ..model.config import ConfigError, LlavaConfig, TextConfig
from ..model.llava import LlavaModel
from .build import (CHAT_TEMPLATE, DECODER, IMAGE_TOKEN, default_text_config, default_tokenizer, extend_vocab,
                    gguf_state, put_decoder)
from .smollm2 import SMOLLM2_FILE

log = logging.getLogger(__name__)

MAX_PARTS_BYTES = 25 * 2**20  # the repo's weights/ budget
MARKER = "assembled.json"  # written last into an assembled folder
ASSEMBLY_FORMAT = 1  # bump when assembly changes what it writes: cached folders are then redone
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
                   "processor_config.json")


# --- the parts format ----------------------------------------------------------------------

def _unwrap(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def base_decoder_state(model: LlavaModel) -> dict[str, torch.Tensor]:
    """The decoder's frozen weights, names normalised from a peft-wrapped decoder, LoRA left out."""
    out = {}
    for key, t in model.language_model.state_dict().items():
        if ".lora_" in key:
            continue
        out[re.sub(r"^base_model\.model\.", "", key).replace(".base_layer.", ".")] = t
    return out


def verify_decoder(model: LlavaModel) -> None:
    """The decoder must be the GGUF's, unchanged (save_parts stores only LoRA deltas)."""
    ours = base_decoder_state(model)
    ref, _ = gguf_state()
    ref = extend_vocab(ref, model.cfg.text.vocab_size)
    differ = []
    for key, want in ref.items():
        have = ours.get(key)
        if have is None or have.shape != want.shape or not torch.equal(have.detach().cpu(), want.to(have.dtype)):
            differ.append(key)
    if differ:
        raise ValueError(f"the model's decoder differs from the GGUF SmolLM2 at {len(differ)} tensor(s) "
                         f"({', '.join(differ[:4])}...): save_parts stores only the LoRA deltas, so pass "
                         "the model with the LoRA unmerged and the decoder otherwise frozen "
                         "(or verify=False to save anyway)")


def save_tokenizer(tokenizer, folder: Path) -> None:
    """tokenizer.json + tokenizer_config.json (+ chat_template.jinja). The class is written as
    PreTrainedTokenizerFast, a name transformers 4.x and 5.x both load (5.x saves 'TokenizersBackend')."""
    tokenizer.save_pretrained(str(folder))
    path = folder / "tokenizer_config.json"
    d = json.loads(path.read_text())
    d["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("is_local", "local_files_only"):  # where it was read from, not what it is
        d.pop(key, None)
    write_json(path, d)


def save_parts(model: LlavaModel, folder: str | Path, lora_state: dict | None = None, lora_config=None,
               extra_files: dict | None = None, dtype: torch.dtype | None = None,
               verify: bool = True) -> Path:
    """Write the trained parts of a default model (see the module docstring), atomically.

    lora_state: LoRA A/B tensors (peft's names accepted); lora_config: a dict or peft LoraConfig
    with r and lora_alpha. extra_files: {name: str | bytes | dict (as JSON)} copied in.
    dtype: how vision parts and LoRA are stored; None: float32 if that fits MAX_PARTS_BYTES,
    else float16. verify: check that the decoder is the GGUF's, untouched (~4 s)."""
    model = _unwrap(model)
    folder = Path(folder)
    if lora_state is not None and lora_config is None:
        raise ValueError("save_parts: lora_state given without lora_config (r, lora_alpha)")
    lora = normalize_lora_state(lora_state) if lora_state else {}
    settings = lora_settings(lora_config, lora, DECODER["file"]) if lora else None
    for _ in lora_deltas(lora, settings, model.cfg.text, "lora_state"):
        pass  # checks every A/B pair against its module's shape before anything is written
    if verify:
        verify_decoder(model)
    parts = hub_state_dict(model, torch.float32, prefixes=("vision_tower.", "projector."))
    fp32_bytes = sum(t.numel() * 4 for t in list(parts.values()) + list(lora.values()))
    dtype = dtype or (torch.float32 if fp32_bytes <= MAX_PARTS_BYTES else torch.float16)
    parts = {k: v.to(dtype) for k, v in parts.items()}
    lora = {k: v.detach().to("cpu", dtype).contiguous() for k, v in lora.items()}

    with atomic_folder(folder) as tmp:
        write_json(tmp / "config.json", llava_hf_config(model.cfg, torch.float32))
        write_safetensors(parts, tmp, name="parts")
        if lora:
            (tmp / "lora").mkdir()
            write_safetensors(lora, tmp / "lora", name="adapter_model")
            write_json(tmp / "lora" / "adapter_config.json", settings)
        save_tokenizer(default_tokenizer(), tmp)
        write_processor_files(tmp, model.cfg, IMAGE_TOKEN, CHAT_TEMPLATE)
        write_json(tmp / "decoder.json", DECODER)
        for name, content in (extra_files or {}).items():
            _write_extra(tmp, name, content)
        total = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
    level = logging.WARNING if total > MAX_PARTS_BYTES else logging.INFO
    log.log(level, "saved parts to %s: %.1f MB (%s; budget %.0f MB)", folder, total / 2**20,
            str(dtype).removeprefix("torch."), MAX_PARTS_BYTES / 2**20)
    return folder


def _write_extra(folder: Path, name: str, content) -> None:
    path = folder / name
    if folder.resolve() not in path.resolve().parents:
        raise ValueError(f"extra_files: {name!r} points outside the folder")
    if path.exists():
        raise ValueError(f"extra_files: {name!r} would overwrite a file save_parts writes")
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        write_json(path, content)


# --- assembly --------------------------------------------------------------------------------

def parts_hash(folder: Path) -> str:
    """12 hex digits of sha256 over the assembly format and every file of a parts folder
    (hidden files such as .gitattributes aside)."""
    h = hashlib.sha256(f"llava_core assembly {ASSEMBLY_FORMAT}\n".encode())
    files = [p for p in folder.rglob("*") if p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    for f in sorted(files):
        h.update(f"{f.relative_to(folder).as_posix()}\n".encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()[:12]


def _read_decoder_json(parts: Path) -> dict:
    path = parts / "decoder.json"
    d = json.loads(path.read_text())
    if d.get("file") != SMOLLM2_FILE:
        raise ConfigError(f"{path}: decoder file {d.get('file')!r} is not one llava_core can find "
                          f"({SMOLLM2_FILE} from {DECODER['package']})")
    if not d.get("sha256"):
        raise ConfigError(f"{path}: no sha256 for the decoder file")
    return d


def _check_text_config(cfg: LlavaConfig, gguf: TextConfig, source: Path) -> None:
    """config.json's decoder must be the GGUF's (vocabulary, eos and pad aside)."""
    want = default_text_config(gguf)
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling",
            "tie_word_embeddings")
    differ = [f"{k}: config {getattr(cfg.text, k)!r}, GGUF {getattr(want, k)!r}" for k in keys
              if getattr(cfg.text, k) != getattr(want, k)]
    if cfg.text.vocab_size < gguf.vocab_size:
        differ.append(f"vocab_size: config {cfg.text.vocab_size} < GGUF {gguf.vocab_size}")
    if differ:
        raise ConfigError(f"{source}: text_config does not describe the GGUF decoder: {'; '.join(differ)}")


def _read_lora(parts: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    from safetensors.torch import load_file

    folder = parts / "lora"
    if not folder.is_dir():
        return {}, None
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder}: lacks {name}")
    settings = json.loads((folder / "adapter_config.json").read_text())
    try:
        state = normalize_lora_state(load_file(str(folder / "adapter_model.safetensors")))
    except ValueError as e:
        raise CheckpointError(f"{folder / 'adapter_model.safetensors'}: {e}") from None
    return state, settings


def _put_vision(model: LlavaModel, parts_file: Path, dtype: torch.dtype,
                prefixes: tuple[str, ...] = ("vision_tower.", "projector.")) -> None:
    """Fill the vision tower and projector (meta) from parts.safetensors, strictly; with
    prefixes=("vision_tower.",) the tower alone (the file's projector is then left unread)."""
    from safetensors.torch import load_file

    state = model.state_dict()
    expected = {k: v for k, v in state.items() if k.startswith(prefixes)}
    loaded, unexpected, mismatched = {}, [], []
    for key, t in load_file(str(parts_file)).items():
        name = map_key(key)
        m = re.fullmatch(r"(.*)\[([qkv])\]", name or "")
        target, part = (m.group(1), m.group(2)) if m else (name, None)
        if target not in expected:
            if not (target in state and target.startswith(("vision_tower.", "projector."))):
                unexpected.append(key)  # a part not asked for is skipped, an unknown key is not
            continue
        shape = tuple(expected[target].shape)
        if part:
            shape = (shape[0] // 3,) + shape[1:]
        if tuple(t.shape) != shape:
            mismatched.append(f"{key}: file {list(t.shape)}, {target} needs {list(shape)}")
            continue
        dest = loaded.setdefault(target, torch.empty(expected[target].shape, dtype=dtype))
        (qkv_rows(dest, part) if part else dest).copy_(t)
    missing = sorted(set(expected) - set(loaded))
    if missing or unexpected or mismatched:
        raise CheckpointError(f"{parts_file}: does not fit the model's {' and '.join(p[:-1] for p in prefixes)}: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}, mismatched {mismatched[:5]}")
    for prefix in prefixes:
        getattr(model, prefix[:-1]).load_state_dict({k[len(prefix):]: v for k, v in loaded.items()
                                                     if k.startswith(prefix)}, strict=True, assign=True)


def load_tower(model: LlavaModel, parts_folder: str | Path) -> None:
    """The vision tower of a parts folder (e.g. weights/) into `model`, in the model's dtype;
    its projector and LoRA are not read. For training on a tower trained before, as LLaVA
    starts from a pretrained CLIP."""
    parts_file = Path(parts_folder) / "parts.safetensors"
    if not parts_file.is_file():
        raise FileNotFoundError(f"{parts_file}: no such file; expected a parts folder such as weights/")
    dtype = next(model.vision_tower.parameters()).dtype
    _put_vision(model, parts_file, dtype, prefixes=("vision_tower.",))


def load_parts(parts_folder: str | Path, dtype: torch.dtype = torch.float32) -> LlavaModel:
    """The assembled LlavaModel of a parts folder, in memory (LoRA merged)."""
    parts = Path(parts_folder)
    for name in ("config.json", "parts.safetensors", "decoder.json"):
        if not (parts / name).is_file():
            raise FileNotFoundError(f"{parts}: not a parts folder (no {name})")
    decoder = _read_decoder_json(parts)
    cfg = LlavaConfig.from_json(parts / "config.json")
    steps = tqdm(total=3, desc=f"assembling {parts.name}", unit="step", leave=False)
    with steps:
        steps.set_postfix_str("decoder")
        state, gguf = gguf_state(torch.float32, decoder["sha256"])
        _check_text_config(cfg, gguf, parts / "config.json")
        state = extend_vocab(state, cfg.text.vocab_size)
        steps.update()
        steps.set_postfix_str("lora")
        lora, settings = _read_lora(parts)
        for name, delta in lora_deltas(lora, settings or {}, cfg.text, str(parts / "lora")):
            state[name] = state[name] + delta  # (out, in), fp32
        steps.update()
        steps.set_postfix_str("vision")
        with torch.device("meta"):
            model = LlavaModel(cfg)
        put_decoder(model, {k: v.to(dtype) for k, v in state.items()})
        _put_vision(model, parts / "parts.safetensors", dtype)
        steps.update()
    log.info("assembled %s: decoder %s + %d LoRA module(s)", parts, decoder["file"], len(lora) // 2)
    return model.eval()


def assemble(parts_folder: str | Path, out_folder: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write the complete llava-hf checkpoint of a parts folder into out_folder (atomically;
    MARKER last). model_cache.assemble_cached names and reuses such folders."""
    parts = Path(parts_folder)
    digest = parts_hash(parts)
    out = Path(out_folder)
    model = load_parts(parts, dtype)
    with atomic_folder(out) as tmp:
        write_llava_hf(model, tmp, dtype)
        for name in TOKENIZER_FILES:
            if (parts / name).is_file():
                shutil.copy2(parts / name, tmp / name)
        if not (tmp / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{parts}: no tokenizer.json")
        shutil.copy2(parts / "decoder.json", tmp / "decoder.json")
        write_json(tmp / MARKER, {"parts": str(parts.resolve()), "parts_hash": digest,
                                  "format": ASSEMBLY_FORMAT, "dtype": str(dtype).removeprefix("torch.")})
    log.info("assembled %s -> %s", parts, out)
    return out
