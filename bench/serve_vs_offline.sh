#!/usr/bin/env bash
# Offline `kit bench` and online `kit bench-serve` against `kit serve`, same workload, same GPU, one run.
#   bash bench/serve_vs_offline.sh OUT_DIR [MODEL]
set -uo pipefail
OUT=$(mkdir -p "$1" && cd "$1" && pwd); MODEL=${2:-synthetic:llama-3.2-1b}
PORT=${PORT:-8011}; export PYTHONUNBUFFERED=1
python3 -m kit.cli bench --model "$MODEL" --input-len 128 --output-len 64 --concurrency 1 64 \
  --num-requests ${NREQ:-192} --out "$OUT/offline.json" 2>&1 | grep -v '%|' | tail -4
python3 -m kit.cli serve "$MODEL" --port "$PORT" --max-batch-size 64 --max-input-len 128 --max-seq-len 192 \
  --max-num-tokens 2048 > "$OUT/serve.log" 2>&1 &
SERVE_PID=$!
for _ in $(seq 1 240); do python3 -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=2)" "http://127.0.0.1:$PORT/health" 2>/dev/null && break; sleep 0.5; done
python3 -m kit.cli bench-serve --endpoint "http://127.0.0.1:$PORT" --input-len 128 --output-len 64 \
  --concurrency 1 64 --num-requests ${NREQ:-192} --out "$OUT/online.json" 2>&1 | grep -v '%|' | tail -4
kill -TERM "$SERVE_PID"; wait "$SERVE_PID"; echo "server exit status $?"
python3 - "$OUT" <<'PY'
import json, sys, os
out = sys.argv[1]
off, on = (json.load(open(os.path.join(out, f))) for f in ("offline.json", "online.json"))
for a, b in zip(off["runs"], on["runs"]):
    ka, kb = a["kit"], b["kit"]
    print(f"c={ka['concurrency']:<3} offline {ka['output_tokens_per_s']:8.1f} tok/s  online {kb['output_tokens_per_s']:8.1f} "
          f"tok/s  online/offline {kb['output_tokens_per_s'] / ka['output_tokens_per_s']:.3f}")
PY
