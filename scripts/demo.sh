#!/usr/bin/env bash
# Set up .venv, train the demo (ResNet-20 on scikit-learn's embedded digits), then test it.
source "$(dirname "$0")/setup.sh"
.venv/bin/lightning-tricks fit -c configs/demo.yaml "$@"
