#!/usr/bin/env bash
# Set up pcav in ./.venv: a virtual environment with pcav (editable), its pinned torch stack,
# a bundled ffmpeg (imageio-ffmpeg) and the test tools. Safe to re-run; quick when done.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
.venv/bin/pcav --version
