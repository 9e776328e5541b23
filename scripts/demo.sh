#!/usr/bin/env bash
# The main job: installs erasekit into .venv, then runs the MiniCanvas demo (erase one style with HiRM, evaluate).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh all
HF_HUB_OFFLINE=1 .venv/bin/erasekit demo "$@"
