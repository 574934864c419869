"""Peak memory while loading a llava-hf checkpoint, as a multiple of the checkpoint's bytes.

Writes a random checkpoint in the hub layout (transformers-4.x names, two shards plus an
index, fp16 like llava-1.5-*-hf): a CLIP ViT-L/14-336 tower and a ~0.5B LLaMA decoder,
about 1.6 GB. Each measurement runs in a fresh interpreter: RSS after the imports, then
load_pretrained, then a pass that reads every weight once (so lazily mapped pages count
too). Reported: (peak RSS - RSS after imports) / bytes of the loaded weights.

    python benchmarks/bench_load.py [--folder DIR] [--keep]

Goal: <= 1.15x, for loading at the stored dtype and for the CPU default (fp16 -> bf16).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL = 1.15

CHILD = r"""
import resource, sys, time
import torch
from llava_core.checkpoints.loader import load_pretrained

def status(field):  # kB
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

base = status("VmRSS")
dtype = None if sys.argv[2] == "default" else getattr(torch, sys.argv[2])
t0 = time.perf_counter()
model = load_pretrained(sys.argv[1], dtype=dtype)
load_s = time.perf_counter() - t0
peak_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
with torch.no_grad():
    for p in model.parameters():
        p.reshape(-1)[:: 4096 // p.element_size()].float().sum()  # read one value per 4 KiB page
peak_all = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(base, peak_load, peak_all, weights, status("RssAnon"), status("RssFile"), load_s, model.dtype)
"""


def hf_config(decoder_layers: int = 10):
    """llava-1.5's CLIP ViT-L/14-336 with a TinyLlama-shaped decoder cut to `decoder_layers` layers."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=decoder_layers,
                       num_attention_heads=32, num_key_value_heads=4, vocab_size=32064,
                       max_position_embeddings=4096, rms_norm_eps=1e-5)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, pad_token_id=32001)


def hub_name(key: str) -> str:
    """transformers-5 in-memory name -> the transformers-4.x hub file name."""
    for old, new in (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                     ("model.vision_tower.", "vision_tower.vision_model."),
                     ("model.multi_modal_projector.", "multi_modal_projector.")):
        if key.startswith(old):
            return new + key[len(old):]
    raise KeyError(key)


def write_checkpoint(folder: Path, dtype_name: str = "float16", shards: int = 2) -> int:
    """Random weights with the exact names and shapes of LlavaForConditionalGeneration; returns bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlavaForConditionalGeneration

    dtype = getattr(torch, dtype_name)
    cfg = hf_config()
    with torch.device("meta"):
        shapes = {hub_name(k): tuple(v.shape) for k, v in LlavaForConditionalGeneration(cfg).state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    total = sum(torch.Size(s).numel() for s in shapes.values()) * dtype.itemsize
    names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map, shard, size, n = {}, {}, 0, 0
    gen = torch.Generator().manual_seed(0)
    for key, shape in shapes.items():
        shard[key] = torch.empty(shape, dtype=dtype).uniform_(-0.01, 0.01, generator=gen)
        weight_map[key] = names[n]
        size += shard[key].numel() * dtype.itemsize
        if size >= total / shards * (n + 1) and n < shards - 1:
            save_file(shard, str(folder / names[n]), metadata={"format": "pt"})
            shard, n = {}, n + 1
    save_file(shard, str(folder / names[n]), metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    d = cfg.to_dict()
    d["dtype"] = dtype_name
    (folder / "config.json").write_text(json.dumps(d, indent=2))
    return total


def measure(folder: Path, dtype: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder), dtype], capture_output=True, text=True,
                         check=False)
    if out.returncode:
        raise RuntimeError(f"child load failed ({dtype}):\n{out.stderr[-3000:]}")
    base, peak_load, peak_all, weights, anon, file_, load_s, model_dtype = out.stdout.split()
    kb = 1024
    return dict(dtype=dtype, model_dtype=model_dtype, weights=int(weights),
                load=(int(peak_load) - int(base)) * kb / int(weights),
                touched=(int(peak_all) - int(base)) * kb / int(weights),
                anon_gb=int(anon) * kb / 1e9, file_gb=int(file_) * kb / 1e9, load_s=float(load_s))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", type=Path, help="where to write the checkpoint (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    ap.add_argument("--dtypes", default="float16,default,float32",
                    help="load dtypes to measure; 'default' is the loader's choice (bf16 for fp16 on CPU)")
    args = ap.parse_args()
    folder = args.folder or Path(tempfile.mkdtemp(prefix="bench_load_"))
    try:
        t0 = time.perf_counter()
        stored = write_checkpoint(folder)
        print(f"checkpoint: {folder}, fp16, {stored / 1e9:.2f} GB in 2 shards, written in "
              f"{time.perf_counter() - t0:.1f} s")
        print(f"{'load dtype':>10} {'model':>15} {'weights GB':>10} {'peak/load':>9} {'peak/all':>9} "
              f"{'anon GB':>8} {'file GB':>8} {'load s':>7}")
        worst = 0.0
        for dtype in args.dtypes.split(","):
            r = measure(folder, dtype)
            worst = max(worst, r["touched"])
            print(f"{r['dtype']:>10} {r['model_dtype']:>15} {r['weights'] / 1e9:>10.2f} {r['load']:>8.3f}x "
                  f"{r['touched']:>8.3f}x {r['anon_gb']:>8.2f} {r['file_gb']:>8.2f} {r['load_s']:>7.2f}")
        print(f"worst peak / weights: {worst:.3f}x (goal <= {GOAL}x): {'ok' if worst <= GOAL else 'ABOVE GOAL'}")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
