#!/usr/bin/env bash
# Install samplemix into .venv and build a mixture of the bundled example corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export PREFECT_SERVER_ANALYTICS_ENABLED=false
.venv/bin/samplemix run examples/mix.yaml "$@"
