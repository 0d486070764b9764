#!/usr/bin/env bash
# Set up pcav in ./.venv: a virtual environment with pcav (editable) and the exact known-good set
# of its dependencies (constraints.txt: torch stack, bundled ffmpeg from imageio-ffmpeg, test
# tools). Safe to re-run; quick when done.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "creating .venv with $($PYTHON --version)"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || { echo "constraints.txt is the known-good set for Python 3.11+; run with PYTHON=python3.11 (or newer)" >&2; exit 1; }
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
.venv/bin/pcav --version
