#!/usr/bin/env bash
# Fresh machine -> exq's pipeline on the bundled demo model, offline, ending with the model served:
# profile + sensitivity + compile (one command) -> quantize into a packed checkpoint -> evaluate against bf16
# -> `exq serve` on port 30000 (EXQ_PORT), answering a first request.
# Run from a terminal, the server then keeps serving until Ctrl-C; otherwise (EXQ_KEEP_SERVING=0, CI, pipes) it
# stops after that request.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export HF_HUB_OFFLINE=1
PORT=${EXQ_PORT:-30000}
set -x
exq compile --model demo/model --corpus demo/corpus/austen.valid.txt.gz demo/corpus/kjv.valid.txt.gz \
    --budget int4 --output runs/demo/plan-int4.json
exq quantize --model demo/model --artifact runs/demo/plan-int4.json --output runs/demo/q-int4 --overwrite
exq eval --model demo/model --quantized runs/demo/q-int4 --compare \
    --corpus demo/corpus/austen.test.txt.gz demo/corpus/kjv.test.txt.gz --tokens 32768 --output runs/demo/eval
exq diagnose --profile runs/demo/profile.json --artifact runs/demo/plan-int4.json --output runs/demo
exq serve --model runs/demo/q-int4 --served-model-name demo --port "$PORT" &
set +x
server=$!
trap 'kill -TERM $server 2>/dev/null || true; wait $server 2>/dev/null || true' EXIT
python - "$PORT" <<'PY'
import json, sys, time, urllib.request

url = f"http://127.0.0.1:{sys.argv[1]}"
for _ in range(240):
    try:
        urllib.request.urlopen(url + "/health", timeout=2)
        break
    except OSError:
        time.sleep(0.5)
else:
    sys.exit("exq serve did not come up")
body = {"model": "demo", "prompt": "It is a truth universally acknowledged", "max_tokens": 32, "temperature": 0}
req = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
answer = json.load(urllib.request.urlopen(req, timeout=120))
print(f"\nPOST {url}/v1/completions {json.dumps(body)}\n-> {answer['choices'][0]['text']!r}  ({answer['usage']})")
PY
if [ -t 1 ] && [ "${EXQ_KEEP_SERVING:-1}" != 0 ]; then
    echo "exq serve is running at http://127.0.0.1:$PORT/v1 (OpenAI API: completions, chat, streaming); Ctrl-C stops it."
    wait "$server"
fi
