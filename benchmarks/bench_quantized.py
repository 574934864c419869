"""GPU memory and decode speed of a LLaVA-1.5-7B-shaped model loaded in fp16, int8 and nf4
(`load_pretrained(..., quantize=...)`, bitsandbytes): random weights, written once as a llava-hf
folder, then loaded three times. Prints, per mode: load time, GPU memory held after loading and
its peak during loading, prefill time for one image + 20 text tokens (596 tokens), and greedy
decode tokens/s (eager prefill/decode_one, batch 1, no CUDA graphs, the same loop for all three).

    python benchmarks/bench_quantized.py [--layers 32] [--new-tokens 64] [--folder DIR] [--json OUT]

Needs a CUDA GPU (it refuses to run without one) and, for int8/nf4, bitsandbytes
(`pip install 'llava_core[gpu]'`); the 7B folder takes ~14 GB of disk (a temp folder unless --folder).
"""

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def build_checkpoint(folder: Path, layers: int) -> None:
    """A random llava-hf folder with llava-1.5-7b's shapes (ViT-L/14-336, mlp2x_gelu, 4096-d LLaMA)."""
    from llava_core.checkpoints.export import save_llava_hf
    from llava_core.model.config import LLAVA_DEFAULT_VISION, LlavaConfig, TextConfig, VisionConfig
    from llava_core.model.llava import LlavaModel

    cfg = LlavaConfig(vision=VisionConfig(**LLAVA_DEFAULT_VISION),
                      text=TextConfig(vocab_size=32064, num_hidden_layers=layers, max_position_embeddings=4096,
                                      rms_norm_eps=1e-5, pad_token_id=32001))
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlavaModel(cfg).half()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02)  # LLaMA's init scale keeps fp16 activations finite over 32 blocks
    save_llava_hf(model, folder, dtype=torch.float16, shard_size="5GB")
    del model
    torch.cuda.empty_cache()


def run(folder: Path, mode: str | None, new_tokens: int) -> dict:
    from llava_core.checkpoints.loader import load_pretrained
    from llava_core.runtime.decode import decode_one, prefill

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t = time.perf_counter()
    model = load_pretrained(folder, dtype=torch.float16, device="cuda", quantize=mode)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t
    held = torch.cuda.memory_allocated() - base
    peak = torch.cuda.max_memory_allocated() - base

    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    text = torch.randint(3, 32000, (20,), generator=g)
    ids = torch.cat([text[:5], torch.full((cfg.num_image_tokens,), cfg.image_token_index), text[5:]])[None].cuda()
    px = torch.randn(1, 3, 336, 336, generator=g).cuda().half()
    result = {"mode": mode or "fp16", "load_s": round(load_s, 2), "gpu_gib_held": round(held / 2**30, 2),
              "gpu_gib_peak_loading": round(peak / 2**30, 2), "prompt_tokens": ids.shape[1]}
    with torch.inference_mode():
        for _ in range(2):  # warm-up: kernels, cuBLAS handles, bitsandbytes state
            cache = model.new_cache(1, ids.shape[1] + new_tokens + 8)
            logits = prefill(model, ids, cache, px)
            for _ in range(4):
                logits = decode_one(model, logits.argmax(-1), cache)
        cache = model.new_cache(1, ids.shape[1] + new_tokens + 8)
        torch.cuda.synchronize()
        t = time.perf_counter()
        logits = prefill(model, ids, cache, px)
        torch.cuda.synchronize()
        result["prefill_ms"] = round((time.perf_counter() - t) * 1e3, 1)
        t = time.perf_counter()
        for _ in range(new_tokens):
            logits = decode_one(model, logits.argmax(-1), cache)
        torch.cuda.synchronize()
        result["decode_tok_s"] = round(new_tokens / (time.perf_counter() - t), 1)
        result["logits_finite"] = bool(torch.isfinite(logits).all())
    del model, cache, logits
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=32, help="decoder blocks (32 for 7B; fewer for a quick look)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--folder", type=Path, help="reuse (or create) the random checkpoint here")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_quantized: needs a CUDA GPU (torch.cuda.is_available() is False); nothing was run",
              file=sys.stderr)
        return 2
    try:
        import bitsandbytes  # noqa: F401
        modes = [None, "int8", "nf4"]
    except ImportError:
        print("bench_quantized: bitsandbytes is not installed; measuring fp16 only", file=sys.stderr)
        modes = [None]

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or Path(tmp) / "llava-7b-random"
        if not (folder / "config.json").is_file():
            t = time.perf_counter()
            build_checkpoint(folder, args.layers)
            print(f"wrote {folder} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
        results = []
        for mode in modes:
            r = run(folder, mode, args.new_tokens)
            results.append(r)
            print(f"{r['mode']:>5}: load {r['load_s']:6.1f} s  GPU held {r['gpu_gib_held']:6.2f} GiB  "
                  f"peak while loading {r['gpu_gib_peak_loading']:6.2f} GiB  prefill ({r['prompt_tokens']} tok) "
                  f"{r['prefill_ms']:7.1f} ms  decode {r['decode_tok_s']:6.1f} tok/s  finite={r['logits_finite']}",
                  flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
