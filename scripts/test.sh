#!/usr/bin/env bash
# Fresh machine -> lint and the whole test suite (CPU only). Extra pytest arguments pass through.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh dev
# shellcheck disable=SC1091
. .venv/bin/activate
export HF_HUB_OFFLINE=1
ruff check .
ruff format --check .
python -m pytest -q -m "not engines" "$@"
