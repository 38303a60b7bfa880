#!/usr/bin/env bash
# Creates .venv (once) and installs the pinned requirements into it. Sourced by run.sh and test.sh,
# so README's two commands work on a fresh clone. EXTRA=test adds the test-only oracles.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "[install] creating .venv with $($PY --version)"
    "$PY" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
fi
REQ=requirements.txt
[ "${EXTRA:-}" = "test" ] && REQ=requirements-test.txt
# a no-op in seconds once installed; the first time torch+torchaudio take a minute or two (about 4.6 GB)
.venv/bin/python -m pip install -q -r "$REQ"
