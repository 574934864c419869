"""Time to first token and decode speed: llava_core against transformers' `generate`.

    python benchmarks/bench_generate.py --dtype bfloat16            # TinyLLaVA shape, random weights
    python benchmarks/bench_generate.py --model default --dtype float32
    python benchmarks/bench_generate.py --device cuda --dtype float16 --shape llava-7b

Builds (once, cached under --ckpt-dir) a random-weight llava-hf checkpoint of the chosen
shape with transformers itself, loads it in both libraries with the same dtype and thread
count, and prints for one 336x336 image and a 32-token question:
  - time to first token (vision + prefill + first token) and decode tokens/s, both sides;
  - the decode memory-bandwidth bound: decoder weight bytes read per token / the read
    bandwidth of a large fp32 `sum` measured in the same run, and our decode as % of it;
  - on the CPU, the compute floor of the first token: its FLOPs / the rate of an fp32 matmul
    of the decoder MLP's shape measured in the same run, and both libraries against it;
  - chat turn-2 time to first token with the kept cache vs re-prefilling everything.
Every figure is the median of --repeats runs, ours and transformers' run in pairs back to back
(a slow spell of a shared machine hits both sides of a pair); the ratios are the medians of
the pairs' ratios. Decode length is forced (no EOS stop). `--busy N` runs N processes of
one-thread fp32 matrix products beside the timings: a machine shared with other work.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

import torch  # noqa: E402

SHAPES = {
    # CLIP ViT-L/14-336 tower; decoder of TinyLlama-1.1B shape
    "tinyllava": dict(text=dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                num_attention_heads=32, num_key_value_heads=4, vocab_size=32064,
                                max_position_embeddings=2048)),
    # LLaVA-1.5-7B: Vicuna-7B decoder
    "llava-7b": dict(text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                               num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                               max_position_embeddings=4096)),
}
VIT_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 image_size=336, patch_size=14, projection_dim=768)


def build_checkpoint(folder: Path, shape: str, dtype: torch.dtype, device: str = "cpu") -> Path:
    """A random llava-hf checkpoint of the given shape, written by transformers (cached).
    Built on `device`: a GPU initialises a 7B model in seconds where 2 CPU cores take minutes."""
    from transformers import LlavaForConditionalGeneration

    from llava_core.testing import make_tokenizer, tiny_hf_config, write_processor_files

    if (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    image_id, pad_id = make_tokenizer(folder)
    s = SHAPES[shape]
    text = dict(s["text"], pad_token_id=pad_id)
    cfg = tiny_hf_config(image_id, pad_id, vocab_size=text.pop("vocab_size"), text=text, vision=VIT_L_336)
    print(f"building a random {shape} checkpoint in {folder} ...", flush=True)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(str(folder))
    write_processor_files(folder, cfg)
    return folder


def read_bandwidth(device: str) -> float:
    """GB/s of a large fp32 sum (reads only), best of 5."""
    x = torch.ones(512 * 2**20 // 4, device=device)  # 512 MiB
    best = float("inf")
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        x.sum()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def decoder_bytes(model) -> int:
    """Weight bytes one decode step reads: every decoder matrix (int8 ones with their scales), the
    norms and the lm_head (tied to the embedding or not); not the embedding table."""
    lm = model.language_model
    named = [*lm.named_parameters(remove_duplicate=False), *lm.named_buffers()]
    seen = {id(t): t for name, t in named if not name.startswith(("embed_tokens.", "rotary."))}
    return sum(t.numel() * t.element_size() for t in seen.values())


def prefill_flops(model, n_prompt: int) -> float:
    """FLOPs (2 per multiply-add) a first token needs: the vision tower's blocks up to the feature
    layer over its patches and class token, the projector, the decoder over the n_prompt-token
    prompt (products and attention), and the lm_head for the last position."""
    vt, lm = model.vision_tower.visual, model.language_model
    n_vis = model.cfg.num_image_tokens + 1  # patches + class token
    blocks = vt.transformer.resblocks[:max(model.vision_tower.block_indices) + 1]
    vis = sum(p.numel() for p in blocks.parameters() if p.dim() == 2) * n_vis
    vis += 2 * n_vis * n_vis * vt.transformer.width * len(blocks)  # q.k and attention.v
    proj = sum(p.numel() for p in model.projector.parameters() if p.dim() == 2) * model.cfg.num_image_tokens
    att = lm.layers[0].self_attn
    dec = sum(p.numel() for p in lm.layers.parameters() if p.dim() == 2) * n_prompt
    dec += 2 * n_prompt * n_prompt * att.n_heads * att.head_dim * len(lm.layers) / 2  # causal: half the pairs
    return 2 * (vis + proj + dec + lm.lm_head.weight.numel())


def matmul_rate(model, n_prompt: int) -> float:
    """GFLOP/s of one fp32 product of the decoder MLP's shape over the prompt (MKL on the CPU),
    best of 3: the rate both libraries' prefill runs at on a CPU without native bf16."""
    cfg = model.cfg.text
    x, w = torch.randn(n_prompt, cfg.hidden_size), torch.randn(cfg.intermediate_size, cfg.hidden_size)
    best = float("inf")
    for _ in range(4):
        t = time.perf_counter()
        torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - t)
    return 2 * x.shape[0] * w.numel() / best / 1e9


def prompt(processor, n_question_tokens: int = 32):
    from PIL import Image

    words = ("what is the colour and the shape of the object in the middle of this picture and why "
             "does it look like that to you please answer in detail").split()
    tok = processor.tokenizer
    question = " ".join(words)
    while len(tok(question, add_special_tokens=False).input_ids) > n_question_tokens:
        question = question.rsplit(" ", 1)[0]
    image = Image.fromarray((torch.rand(336, 336, 3) * 255).to(torch.uint8).numpy())
    return question, image


def run_ours(model, processor, question, image, new_tokens, device, cuda_graph=True) -> tuple[float, float, int]:
    """One generation: (time to first token, decode tokens/s, prompt tokens)."""
    from llava_core.runtime.decode import SamplingParams, decode_loop, prefill

    enc = processor(text=[processor.prompt(question)], images=[image])
    ids = enc["input_ids"].to(device)
    px = enc["pixel_values"].to(device, model.dtype)
    params = SamplingParams(max_new_tokens=new_tokens)
    with torch.inference_mode():
        cache = model.new_cache(1, ids.shape[1] + new_tokens)
        sync(device)
        t0 = time.perf_counter()
        logits = prefill(model, ids, cache, px)
        steps = decode_loop(model, logits, cache, params, eos_token_ids=[], cuda_graph=cuda_graph)
        next(steps)
        sync(device)
        t1 = time.perf_counter()
        n = sum(1 for _ in steps)
        sync(device)
        t2 = time.perf_counter()
    return t1 - t0, n / (t2 - t1), ids.shape[1]


def time_ours(model, processor, question, image, new_tokens, device, repeats, cuda_graph=True):
    """Medians of `repeats` generations after one warm-up: (TTFT, decode tokens/s, prompt tokens)."""
    runs = [run_ours(model, processor, question, image, new_tokens, device, cuda_graph)
            for _ in range(repeats + 1)][1:]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs), runs[0][2]


class _Clock:
    """A transformers streamer that only notes when each new token arrives."""

    def __init__(self, device):
        self.device, self.times, self.calls = device, [], 0

    def put(self, value):
        self.calls += 1
        if self.calls > 1:  # the first call carries the prompt
            sync(self.device)
            self.times.append(time.perf_counter())

    def end(self):
        pass


def run_hf(hf, processor, question, image, new_tokens, device) -> tuple[float, float]:
    """One transformers `generate`, timed per token through a streamer: (TTFT = start -> first
    new token, decode = tokens after the first / time between the first and the last). A
    projector transformers cannot run whole (mlp2x_gelu_cols) gets its image features from
    transformers' own tower and MLP through `inputs_embeds`, inside the timed span."""
    from llava_core.testing import transformers_embeds

    enc = processor(text=[processor.prompt(question)], images=[image])
    ids, pixels = enc["input_ids"].to(device), enc["pixel_values"].to(device, hf.dtype)
    kw = dict(attention_mask=enc["attention_mask"].to(device), do_sample=False, pad_token_id=0,
              max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    kind = processor.cfg.projector.kind
    with torch.inference_mode():
        clock = _Clock(device)
        sync(device)
        t0 = time.perf_counter()
        if kind == "mlp2x_gelu":
            hf.generate(input_ids=ids, pixel_values=pixels, **kw, streamer=clock)
        else:
            embeds = transformers_embeds(hf, ids, pixels, processor.cfg.image_token_index, kind)
            hf.generate(inputs_embeds=embeds, **kw, streamer=clock)
    return clock.times[0] - t0, (len(clock.times) - 1) / (clock.times[-1] - clock.times[0])


def time_chat(model, processor, image, device, repeats):
    """Turn-2 time to first token: kept cache vs a fresh prefill of the whole conversation."""
    from llava_core.runtime.chat import ChatSession

    kept, fresh = [], []
    for _ in range(repeats + 1):
        chat = ChatSession(model, processor, images=image, max_context=1024)
        chat.ask("What is in the picture?", max_new_tokens=16)
        chat.messages.append({"role": "user", "content": [{"type": "text", "text": "What colour is it?"}]})
        ids = chat.prompt_ids()
        sync(device)
        t = time.perf_counter()
        chat.prefill(ids)
        sync(device)
        kept.append(time.perf_counter() - t)
        other = ChatSession(model, processor, images=image, max_context=1024)
        other.messages, other.images = chat.messages, chat.images
        sync(device)
        t = time.perf_counter()
        other.prefill(ids)
        sync(device)
        fresh.append(time.perf_counter() - t)
    return statistics.median(kept[1:]), statistics.median(fresh[1:])


def _spin(stop) -> None:
    torch.set_num_threads(1)
    a = torch.randn(384, 384)
    while not stop.is_set():
        a = torch.tanh(a @ a)


@contextlib.contextmanager
def busy(n: int):
    """n processes multiplying matrices on one thread each until the block ends."""
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    procs = [ctx.Process(target=_spin, args=(stop,), daemon=True) for _ in range(n)]
    for p in procs:
        p.start()
    time.sleep(3.0 if n else 0.0)  # their imports done, the load on
    try:
        yield
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=10)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a llava-hf folder or 'default'; else a random --shape")
    ap.add_argument("--shape", default="tinyllava", choices=sorted(SHAPES))
    ap.add_argument("--ckpt-dir", default=os.path.join(tempfile.gettempdir(), "llava_core_bench"))
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=33)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--int8", action="store_true", help="llava_core with weight-only int8 (transformers as --dtype)")
    ap.add_argument("--busy", type=int, default=0, metavar="N",
                    help="N one-thread matmul processes beside the timings (a shared, loaded machine)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    from transformers import LlavaForConditionalGeneration

    from llava_core.checkpoints.loader import load_pretrained
    from llava_core.model.processor import LlavaProcessor

    if args.model:
        folder = Path(args.model)
        if args.model == "default":
            from llava_core.default.cache import resolve_model
            folder = resolve_model(args.model)
    else:
        folder = build_checkpoint(Path(args.ckpt_dir) / f"{args.shape}-{args.dtype}", args.shape, dtype,
                                  args.device)
    processor = LlavaProcessor.from_pretrained(folder)
    question, image = prompt(processor)
    print(f"checkpoint {folder}; {args.dtype} on {args.device}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}", flush=True)

    model = load_pretrained(folder, dtype=dtype, device=args.device)
    if args.int8:
        from llava_core.model.quantize import quantize_int8
        quantize_int8(model.language_model)
        print("llava_core runs with weight-only int8 decoder projections and lm_head (--int8)")
    hf = None
    if not args.skip_hf:
        hf = LlavaForConditionalGeneration.from_pretrained(folder, dtype=dtype).to(args.device).eval()
    # Paired runs, ours then transformers' back to back, after one warm-up each: a slow spell of
    # a shared machine then slows both sides of a pair, and the ratio is the median of the pairs'.
    ours, theirs = [], []
    with busy(args.busy):
        if args.busy:
            print(f"{args.busy} busy process(es) beside the timings (--busy)")
        for i in range(args.repeats + 1):
            ours.append(run_ours(model, processor, question, image, args.new_tokens, args.device))
            if hf is not None:
                theirs.append(run_hf(hf, processor, question, image, args.new_tokens, args.device))
        bw = read_bandwidth(args.device)
    ours, theirs = ours[1:], theirs[1:]
    ttft, tps, n_prompt = statistics.median(r[0] for r in ours), statistics.median(r[1] for r in ours), ours[0][2]
    weight_bytes = decoder_bytes(model)
    bound = bw * 1e9 / weight_bytes
    print(f"prompt: {n_prompt} tokens ({model.cfg.num_image_tokens} image tokens), {args.new_tokens} new tokens; "
          f"medians of {args.repeats} runs")
    print(f"llava_core    TTFT {ttft:7.3f} s   decode {tps:7.2f} tok/s")
    if args.device.startswith("cuda"):
        e_ttft, e_tps, _ = time_ours(model, processor, question, image, args.new_tokens, args.device,
                                     args.repeats, cuda_graph=False)
        print(f"llava_core, eager decode (cuda_graph=False): TTFT {e_ttft:7.3f} s   decode {e_tps:7.2f} tok/s")
    print(f"bandwidth bound: {weight_bytes / 1e9:.3f} GB/token at {bw:.1f} GB/s (fp32 sum) = {bound:.2f} tok/s; "
          f"llava_core decode = {100 * tps / bound:.0f}% of it")
    floor = None
    if args.device == "cpu":
        flops, rate = prefill_flops(model, n_prompt), matmul_rate(model, n_prompt)
        floor = flops / rate / 1e9
        print(f"compute floor of the first token: {flops / 1e12:.3f} TFLOP at {rate:.0f} GFLOP/s (an fp32 "
              f"matmul of the MLP's shape, this run) = {floor:.2f} s; llava_core TTFT = {ttft / floor:.2f}x it")
    kept, fresh = time_chat(model, processor, image, args.device, args.repeats)
    print(f"chat turn 2 TTFT: kept cache {kept:.3f} s, full re-prefill {fresh:.3f} s ({fresh / kept:.1f}x)")
    if hf is not None:
        hf_ttft, hf_tps = statistics.median(r[0] for r in theirs), statistics.median(r[1] for r in theirs)
        print(f"transformers  TTFT {hf_ttft:7.3f} s   decode {hf_tps:7.2f} tok/s"
              + (f"   (TTFT = {hf_ttft / floor:.2f}x the compute floor)" if floor else ""))
        print(f"ratio (median over the pairs): TTFT "
              f"{statistics.median(o[0] / t[0] for o, t in zip(ours, theirs)):.2f}x transformers' (lower is better), "
              f"decode {statistics.median(o[1] / t[1] for o, t in zip(ours, theirs)):.2f}x transformers'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
