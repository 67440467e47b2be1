#!/usr/bin/env bash
# Creates .venv and installs trp with its test extras (torch pinned by constraints.txt).
# Re-running is cheap: nothing is reinstalled unless pyproject.toml or constraints.txt changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${TRP_VENV:-.venv}"
stamp="$VENV/.trp-setup-stamp"
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import trp" 2>/dev/null; then
  exit 0
fi
echo "setting up $VENV (torch, torchvision, trp) ..." >&2
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
"$VENV/bin/python" -m pip install --quiet -c constraints.txt -e ".[test]" >&2
echo "$want" > "$stamp"
