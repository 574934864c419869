"""`llava-core info`: load a checkpoint and describe it (components, parameters, tokens, context)."""

from __future__ import annotations

import json
from pathlib import Path

from .common import DTYPES, checkpoint_folder, torch_dtype


def add_info(sub) -> None:
    p = sub.add_parser("info", help="load a checkpoint and describe it",
                       description="Load a llava-hf checkpoint folder and print its components, parameter "
                                   "counts, dtype, image tokens per image, vocabulary and context length.")
    p.add_argument("path", help="llava-hf checkpoint folder (config.json + safetensors)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="dtype to load in (auto: as stored; fp16 becomes bf16 on CPU)")
    p.add_argument("--device", default="cpu", help="torch device to load onto (default: cpu)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(run=cmd_info)


def describe(model, folder: Path) -> dict:
    """Components, parameter counts and the numbers a user of the checkpoint needs."""
    from ..checkpoints.loader import checkpoint_dtype

    cfg = model.cfg

    def count(module) -> int:
        return sum(p.numel() for p in module.parameters())  # parameters() counts a tied tensor once

    v, t = cfg.vision, cfg.text
    parts = {
        "vision_tower": count(model.vision_tower),
        "projector": count(model.projector),
        "decoder": count(model.language_model),
    }
    return {
        "checkpoint": str(folder),
        "dtype": str(model.dtype).removeprefix("torch."),
        "stored_dtype": str(checkpoint_dtype(folder)).removeprefix("torch."),
        "device": str(model.device),
        "components": {
            "vision_tower": f"CLIP ViT (open_clip), {v.image_size}px, patch {v.patch_size}, "
                            f"{v.num_hidden_layers} layers, width {v.hidden_size}, {v.num_attention_heads} heads",
            "projector": f"{cfg.projector.kind}, {cfg.vision_feature_dim} -> {t.hidden_size}",
            "decoder": f"LLaMA, {t.num_hidden_layers} layers, width {t.hidden_size}, {t.num_attention_heads} heads "
                       f"({t.num_key_value_heads} KV), MLP {t.intermediate_size}"
                       + (", tied embeddings" if t.tie_word_embeddings else ""),
        },
        "parameters": {**parts, "total": count(model)},
        "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "vision_feature_layer": cfg.vision_feature_layer,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        "image_tokens_per_image": cfg.num_image_tokens,
        "image_token_index": cfg.image_token_index,
        "vocab_size": t.vocab_size,
        "context_length": t.max_position_embeddings,
        "rope": {"theta": t.rope_theta, "scaling": t.rope_scaling},
    }


def format_info(info: dict) -> str:
    n = info["parameters"]
    rope = f"theta {info['rope']['theta']:g}" + (f", {info['rope']['scaling']}" if info["rope"]["scaling"] else "")
    rows = [
        ("checkpoint", info["checkpoint"]),
        ("dtype", f"{info['dtype']} on {info['device']} (stored as {info['stored_dtype']})"),
        ("vision tower", f"{n['vision_tower']:>15,} parameters  {info['components']['vision_tower']}"),
        ("projector", f"{n['projector']:>15,} parameters  {info['components']['projector']}"),
        ("decoder", f"{n['decoder']:>15,} parameters  {info['components']['decoder']}"),
        ("total", f"{n['total']:>15,} parameters  {info['weight_bytes'] / 2**20:,.1f} MiB of weights"),
        ("image tokens", f"{info['image_tokens_per_image']} per image (token id {info['image_token_index']}; "
                         f"vision layer {info['vision_feature_layer']}, "
                         f"{info['vision_feature_select_strategy']} strategy)"),
        ("vocabulary", f"{info['vocab_size']:,} tokens"),
        ("context", f"{info['context_length']:,} tokens, rope {rope}"),
    ]
    return "\n".join(f"{name:<13} {value}" for name, value in rows)


def cmd_info(args) -> int:
    folder = checkpoint_folder(args.path)
    from ..model.config import LlavaConfig
    LlavaConfig.from_json(folder)  # config errors before the slow imports
    from ..checkpoints.loader import load_pretrained

    model = load_pretrained(folder, dtype=torch_dtype(args.dtype), device=args.device)
    info = describe(model, folder)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0
