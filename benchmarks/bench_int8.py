"""What weight-only int8 costs in accuracy, and what it buys in decode speed, on the default model.

    python benchmarks/bench_int8.py [--questions 200] [--threads 2]

Loads the default model in bf16 twice, quantises the second copy's decoder (`quantize_int8`:
every projection and the lm_head, one symmetric scale per row), and prints for each: exact
match on the first --questions synthetic test questions, how many greedy answers are the same
as bf16's, and decode tokens/s on bench_generate's prompt (median of 3 after a warm-up).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from bench_generate import prompt, time_ours  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from llava_core.checkpoints.loader import load_pretrained
    from llava_core.default.cache import resolve_model
    from llava_core.eval import evaluate_synthetic
    from llava_core.model.processor import LlavaProcessor
    from llava_core.model.quantize import quantize_int8

    folder = resolve_model("default")
    processor = LlavaProcessor.from_pretrained(folder)
    question, image = prompt(processor)
    results = {}
    for name in ("bf16", "int8"):
        model = load_pretrained(folder, dtype=torch.bfloat16)
        if name == "int8":
            quantize_int8(model.language_model)
        rows: list = []
        acc = evaluate_synthetic(model, processor, splits=("test",), n_per_split=args.questions,
                                 predictions=rows)["test"]["overall"]["acc"]
        _, tps, _ = time_ours(model, processor, question, image, 33, "cpu", 3)
        results[name] = (acc, [r["prediction"] for r in rows], tps)
    same = sum(a == b for a, b in zip(results["bf16"][1], results["int8"][1]))
    print(f"default model, {args.questions} synthetic test questions, {torch.get_num_threads()} threads")
    for name, (acc, _, tps) in results.items():
        print(f"{name:5s} exact match {100 * acc:5.1f}%   decode {tps:6.2f} tok/s")
    print(f"int8 answers identical to bf16's: {same}/{len(results['bf16'][1])}; "
          f"decode {results['int8'][2] / results['bf16'][2]:.2f}x bf16")
    return 0


if __name__ == "__main__":
    sys.exit(main())
