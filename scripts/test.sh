#!/usr/bin/env bash
# Install samplemix into .venv (if needed), check style, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export PREFECT_SERVER_ANALYTICS_ENABLED=false
.venv/bin/ruff check samplemix tasks flows tests bench
.venv/bin/python -m pytest -q --durations=25 "$@"
