#!/usr/bin/env bash
# Create .venv and install the package into it, with the extras named in $1 (e.g. "dev").
# Re-installs only when pyproject.toml changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
stamp=".venv/.installed${extras:+-$extras}"
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install --disable-pip-version-check -q -e ".${extras:+[$extras]}"
    touch "$stamp"
fi
