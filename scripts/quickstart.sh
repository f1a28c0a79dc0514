#!/usr/bin/env bash
# Fresh machine -> exq's pipeline on the bundled demo model, offline:
# profile + sensitivity + compile (one command) -> quantize into a packed checkpoint -> evaluate against bf16.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export HF_HUB_OFFLINE=1
set -x
exq compile --model demo/model --corpus demo/corpus/austen.valid.txt.gz demo/corpus/kjv.valid.txt.gz \
    --budget int4 --output runs/demo/plan-int4.json
exq quantize --model demo/model --artifact runs/demo/plan-int4.json --output runs/demo/q-int4 --overwrite
exq eval --model demo/model --quantized runs/demo/q-int4 --compare \
    --corpus demo/corpus/austen.test.txt.gz demo/corpus/kjv.test.txt.gz --tokens 32768 --output runs/demo/eval
exq diagnose --profile runs/demo/profile.json --artifact runs/demo/plan-int4.json --output runs/demo
