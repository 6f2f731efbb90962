#!/usr/bin/env bash
# Set up .venv, train the demo (ResNet-20 on scikit-learn's embedded digits), then test it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/lightning-tricks fit -c configs/demo.yaml "$@"
