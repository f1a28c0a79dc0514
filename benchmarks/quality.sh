#!/usr/bin/env bash
# Quality at fixed bytes (issue targets): for each model, plans at the bytes of uniform int4 and at 3.25 bits per
# weight, packed checkpoints, and one `exq eval --compare` over the 4 test splits. Copies the reports to docs/bench.
#
#   benchmarks/quality.sh [MODEL_NAME ...]        (default: olmoe-mini qwen3moe-mini; models in $EXQ_SHARED/models)
#   EXQ_TUNE_STEPS=150 benchmarks/quality.sh ...  (adds end-to-end scale tuning to the int4 checkpoint)
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${EXQ_SHARED:-../shared}
C=$SHARED/corpus
DOMAINS=(austen shakespeare kjv pydocs)
valid=(); test=()
for d in "${DOMAINS[@]}"; do valid+=("$C/$d.valid.txt.gz"); test+=("$C/$d.test.txt.gz"); done
export HF_HUB_OFFLINE=1
for name in "${@:-olmoe-mini qwen3moe-mini}"; do
  for M in $name; do
    model=$SHARED/models/$M; out=runs/quality/$M
    for B in int4 3.25bpw; do
      /usr/bin/time -f "compile $M $B: %e s" exq compile --model "$model" --corpus "${valid[@]}" --budget "$B" \
          --output "$out/plan-$B.json"
      tune=0; [ "$B" = int4 ] && tune=${EXQ_TUNE_STEPS:-0}
      exq quantize --model "$model" --artifact "$out/plan-$B.json" --output "$out/q-$B" --overwrite --tune-steps "$tune"
    done
    exq eval --model "$model" --quantized "$out/q-int4" "$out/q-3.25bpw" --corpus "${test[@]}" --tokens 65536 \
        --compare --output "$out/eval"
    mkdir -p docs/bench
    # the report names files relative to this checkout; keep machine-specific prefixes out of docs
    sed "s#$SHARED#\$EXQ_SHARED#g" "$out/eval/report.json" > "docs/bench/quality_$M.json"
    cp "$out/eval/pareto.png" "docs/bench/quality_${M}_pareto.png"
    cp "$out/eval/plan-0.png" "docs/bench/quality_${M}_plan_int4.png"
  done
done
