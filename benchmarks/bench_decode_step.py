"""One decode step of the default model's decoder shape in llava_core's CPU kernels, at
several software-prefetch distances, against the read bandwidth bench_generate.py takes as
its bound (a 512 MiB fp32 `sum`, best of 5).

The step is what generation runs per token on the CPU: `decode_layers` through the 30
SmolLM2-135M blocks (576 wide, MLP 1536, 9 heads / 3 KV heads of 64) at a cache slot of 110,
then the 49152 x 576 lm_head. Weights are random (the speed does not depend on their values),
fp32 or bf16. Each round times every distance (median of --n steps) and the `sum`, so a shared
machine's drifting bandwidth touches every arm alike; each arm's speed against the first is
taken round by round (paired), then the median over rounds.

    python benchmarks/bench_decode_step.py [--prefetch 0,2048,4096,8192,16384] [--dtype float32]
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

C, I, H, HKV, D, LAYERS, VOCAB, SLOT = 576, 1536, 9, 3, 64, 30, 49152, 110


def median_seconds(fn, n: int) -> float:
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def decoder_tensors(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """decode_layers' 9 tensors per block: norm, q, k, v, o, norm, gate, up, down."""
    g = torch.Generator().manual_seed(seed)

    def w(n, k):
        return (torch.randn(n, k, generator=g) * 0.02).to(dtype)

    out = []
    for _ in range(LAYERS):
        out += [torch.ones(C, dtype=dtype), w(H * D, C), w(HKV * D, C), w(HKV * D, C), w(C, H * D),
                torch.ones(C, dtype=dtype), w(I, C), w(I, C), w(C, I)]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefetch", default="0,2048,4096,8192,16384", help="bytes ahead, comma-separated")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("-n", type=int, default=15, help="steps per timing")
    args = ap.parse_args(argv)
    try:
        distances = [int(d) for d in args.prefetch.split(",")]
    except ValueError:
        raise SystemExit(f"--prefetch {args.prefetch!r}: expected comma-separated byte counts")
    torch.set_num_threads(args.threads)
    from bench_generate import read_bandwidth  # this folder is on sys.path when run as a script

    from llava_core.model import cpu_kernels

    if not cpu_kernels.available():
        raise SystemExit("llava_core's CPU kernels are not available here (no AVX2/FMA, no compiler, "
                         "or LLAVA_CORE_CPU_KERNELS=0)")
    kernels = cpu_kernels._module()
    dtype = getattr(torch, args.dtype)
    weights = decoder_tensors(dtype)
    head = (torch.randn(VOCAB, C, generator=torch.Generator().manual_seed(1)) * 0.02).to(dtype)
    step_bytes = sum(t.numel() * t.element_size() for t in weights + [head])
    kc = torch.zeros(LAYERS, 1, HKV, SLOT + 16, D, dtype=dtype)
    vc = torch.zeros_like(kc)
    x = torch.randn(1, C).to(dtype)
    cos, sin = torch.ones(1, D, dtype=dtype), torch.zeros(1, D, dtype=dtype)

    def step():
        y = kernels.decode_layers(x, weights, [], kc, vc, 0, cos, sin, SLOT, D ** -0.5, 1e-5, None)
        return kernels.gemv(y, [head], [], False)[0]

    default = cpu_kernels.set_prefetch_bytes(0)
    times = {d: [] for d in distances}
    sums = []
    for _ in range(args.rounds):
        sums.append(read_bandwidth("cpu"))
        for d in distances:
            cpu_kernels.set_prefetch_bytes(d)
            times[d].append(median_seconds(step, args.n))
    cpu_kernels.set_prefetch_bytes(default)
    for r, gbs in enumerate(sums):
        steps = ", ".join(f"{d}: {times[d][r] * 1e3:.2f}" for d in distances)
        print(f"round {r}: sum {gbs:5.1f} GB/s; ms a step {steps}")
    bound = statistics.median(sums)
    print(f"{args.dtype}, {args.threads} threads, {step_bytes / 1e9:.3f} GB of weights a step; "
          f"fp32 sum {bound:.1f} GB/s (rounds: {', '.join(f'{s:.1f}' for s in sums)})")
    first = times[distances[0]]
    for d in distances:
        t = statistics.median(times[d])
        ratios = sorted(a / b for a, b in zip(first, times[d]))  # paired by round
        print(f"prefetch {d:>6} B: {t * 1e3:6.2f} ms a step, {1 / t:5.1f} steps/s, {step_bytes / t / 1e9:5.1f} GB/s "
              f"({step_bytes / t / 1e9 / bound:4.0%} of the sum); speed against prefetch {distances[0]}: median "
              f"{statistics.median(ratios):.2f}x, rounds {ratios[0]:.2f}-{ratios[-1]:.2f}x")


if __name__ == "__main__":
    main()
