#!/usr/bin/env bash
# The test suite on a fresh machine: set up, then pytest (extra arguments are passed on).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
