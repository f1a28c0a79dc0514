#!/usr/bin/env bash
# Create .venv (once) and install exq into it: `scripts/setup_env.sh [EXTRAS]`, e.g. `scripts/setup_env.sh dev`.
# torch is installed first, and only if the venv has none: EXQ_TORCH (default "torch==2.13.0") is the pip
# requirement, so a machine with a CPU wheel on disk keeps it and a GPU machine can name its own build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "exq needs Python >= 3.11; $PY is $("$PY" --version 2>&1). Set PYTHON=python3.11 (or newer)." >&2
    exit 2
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
log=$(mktemp)
quiet() { "$@" >"$log" 2>&1 || { cat "$log" >&2; echo "setup failed: $*" >&2; exit 1; }; }
# shellcheck disable=SC2086  # EXQ_TORCH may hold several pip arguments
python -c 'import torch' 2>/dev/null || quiet pip install ${EXQ_TORCH:-torch==2.13.0}
quiet pip install -e ".${1:+[$1]}"
rm -f "$log"
