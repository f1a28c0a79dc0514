#!/usr/bin/env bash
# Fresh machine -> exq's pipeline on the bundled demo model, offline: profile -> compile -> diagnose.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export HF_HUB_OFFLINE=1
set -x
exq profile --model demo/model \
    --corpus demo/corpus/austen.valid.txt.gz demo/corpus/kjv.valid.txt.gz \
    --tokens 20000 --output runs/demo/profile.json
exq compile --profile runs/demo/profile.json --budget int4 --output runs/demo/plan.json
exq diagnose --profile runs/demo/profile.json --artifact runs/demo/plan.json --output runs/demo
