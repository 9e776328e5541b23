#!/usr/bin/env bash
# The test command: installs what it needs into .venv, lints, then runs the default (not slow) test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh all
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q "$@"
