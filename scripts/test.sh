#!/usr/bin/env bash
# Set up .venv with the dev extra and run the whole test suite.
source "$(dirname "$0")/setup.sh" dev
.venv/bin/python -m pytest "$@"
