#!/usr/bin/env bash
# Set up attnxfer in ./.venv (idempotent): torch/torchvision, the package with its test extra,
# and the demo dataset package (installed WITHOUT its declared dependencies, which include tensorflow).
#
#   ATTNXFER_TORCH="torch==2.14.1 torchvision==0.29.1"   the torch pair to install (default: the pair
#                                                        known to load together on CPU-only machines)
#   ATTNXFER_VENV=.venv                                  where the virtual environment goes
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ATTNXFER_VENV:-.venv}
TORCH=${ATTNXFER_TORCH:-"torch==2.14.1 torchvision==0.29.1"}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install -q $TORCH
"$VENV/bin/python" -m pip install -q -e ".[test]"
"$VENV/bin/python" -m pip install -q --no-deps "animal-mnist==0.4"
"$VENV/bin/python" -c "import attnxfer, torch, timm; print(f'attnxfer {attnxfer.__version__} ready (torch {torch.__version__}, timm {timm.__version__}) in $VENV')"
