#!/usr/bin/env bash
# The GPU checks in one go (fp16 CUDA tests against transformers, the tiny recipe trained on
# the GPU, then the CUDA benchmarks).
# Run on a machine with a CUDA GPU and torch, transformers and open_clip installed:
#   bash benchmarks/gpu_check.sh [OUTDIR]
set -uo pipefail
out=${1:-gpu_check_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_train.py -k "cuda or prefetch" 2>&1 \
  | tee "$out/tests.log"
python3 benchmarks/bench_generate.py --device cuda --dtype float16 --shape tinyllava --repeats 5 2>&1 | tee "$out/bench_tinyllava.log"
python3 benchmarks/bench_generate.py --device cuda --dtype float16 --shape llava-7b --repeats 3 2>&1 | tee "$out/bench_llava7b.log"
