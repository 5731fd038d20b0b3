#!/usr/bin/env bash
# Run where PyPI is reachable, before a GPU machine is lent: downloads into .whl/ (ignored) the wheels
# that machine's image lacks (our pinned transformers, pydantic, lm-eval and what they need), for
# CPython 3.12 on x86-64 Linux, and prints each wheel, why it travels and the folder's size.
#   bench/device_check_prepare.sh [--dir DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exec "$PY" bench/device/wheels.py "$@"
