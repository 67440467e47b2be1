#!/usr/bin/env bash
# The main job on a fresh machine: set up, then `trp demo` (extra arguments are passed on).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/trp demo "$@"
