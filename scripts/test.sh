#!/usr/bin/env bash
# Install everything the tests need (Debian's chromium included) and run the whole suite:
# lint, types, layer contracts, then unit, integration and end-to-end tests.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
ensure_debian_packages chromium
ensure_venv
pip_quiet install -e '.[dev]'
export SALON_TEST_MODEL_CACHE="${SALON_TEST_MODEL_CACHE:-$PWD/.cache/models}"
SALON_DATA_DIR="$PWD/.cache" SALON_EMBEDDED__CACHE_DIR="$SALON_TEST_MODEL_CACHE" \
  .venv/bin/salon models prepare embedded:smollm2-135m-instruct
.venv/bin/ruff check src tests bench
.venv/bin/ruff format --check src
.venv/bin/mypy
.venv/bin/lint-imports
exec .venv/bin/python -m pytest "$@"
