"""Read bandwidth of one bf16 matrix-vector product (decode's inner operation) on the CPU:
llava_core's AVX2 kernel (with and without its Python wrapper), torch's bf16 and fp32
F.linear, and a plain fp32 `sum` over the same number of bytes, for the TinyLLaVA decoder's
matrix shapes. Matrices under ~32 MB may sit in the L3 cache; the 131 MB lm_head shows DRAM.

    python benchmarks/bench_gemv.py [--threads 2]
"""

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SHAPES = [(5632, 2048), (2048, 5632), (2048, 2048), (256, 2048), (32064, 2048)]  # (out, in)


def seconds(fn, n=30):
    fn(), fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from llava_core.model import cpu_kernels

    if not cpu_kernels.available():
        print("the AVX2 kernel is not available here (no AVX2/FMA, no compiler, or LLAVA_CORE_CPU_KERNELS=0)")
    print(f"{args.threads} threads; GB/s of weight bytes read (fp32 columns count fp32 bytes)")
    for n, k in SHAPES:
        w, x = torch.randn(n, k).bfloat16(), torch.randn(1, k).bfloat16()
        wf, xf = w.float(), x.float()
        gb = n * k * 2 / 1e9
        row = {"torch bf16": gb / seconds(lambda: F.linear(x, w)),
               "torch fp32": 2 * gb / seconds(lambda: F.linear(xf, wf))}
        if cpu_kernels.available():
            row["ours"] = gb / seconds(lambda: cpu_kernels.linear(x, w))
            row["ours, kernel alone"] = gb / seconds(lambda: cpu_kernels._module().gemv(xf, [w], [], False)[0])
        ones = torch.ones(n * k // 2)  # the same bytes as the bf16 matrix
        row["fp32 sum"] = gb / seconds(lambda: ones.sum())
        print(f"{n:>6} x {k:<5} ({gb * 1e3:6.1f} MB): " + ", ".join(f"{a} {b:.1f}" for a, b in row.items()))


if __name__ == "__main__":
    main()
