#!/usr/bin/env bash
# The prepared device check: every CUDA path run, timed and compared with a CPU run, in one command.
#   bench/device_check.sh FIGURES_DIR          on a GPU machine as it is (no network): installs the wheels
#                                              of .whl/ (bench/device_check_prepare.sh fetched them) into
#                                              a folder on PYTHONPATH, then runs bench/device/check.py
#   bench/device_check.sh --cpu FIGURES_DIR    the dry run on the tiny models, on the CPU (run by make test)
# Other options go to check.py (--budget, --work, --keep, --big-layers). Exit status 1 when a step failed.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PYPATH="$ROOT/src"
if [[ " $* " != *" --cpu "* ]]; then
  WHEELS=${WHEELS:-$ROOT/.whl}
  SITE=${SITE:-/tmp/moe_slim_device_site}
  if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "moe-slim: no wheels in $WHEELS (run bench/device_check_prepare.sh where PyPI is reachable)" >&2; exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
    --upgrade --target "$SITE" "$WHEELS"/*.whl
  PYPATH="$PYPATH:$SITE"
fi
export PYTHONPATH="$PYPATH${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" "$ROOT/bench/device/check.py" "$@"
