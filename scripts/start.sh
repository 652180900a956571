#!/usr/bin/env bash
# Install salon into .venv and start it on http://127.0.0.1:8000 with the embedded model
# and SQLite in ./data (override with SALON_* variables, see docs/configuration.md).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
ensure_venv
pip_quiet install -e .
install_embedding_model
exec .venv/bin/salon serve "$@"
