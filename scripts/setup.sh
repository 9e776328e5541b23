#!/usr/bin/env bash
# Creates .venv (if needed) and installs erasekit with the given extras, pinned by constraints.txt.
# Usage: scripts/setup.sh [EXTRAS]   e.g. scripts/setup.sh all
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-all}"
[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=".venv/.erasekit-installed-$extras"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c constraints.txt torch==2.13.0
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[$extras]"
  touch "$stamp"
fi
