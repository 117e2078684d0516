#!/usr/bin/env bash
# Offline `kit bench` and online `kit bench-serve` against `kit serve`, same workload, same machine, one run.
#   bash bench/serve_vs_offline.sh OUT_DIR [MODEL]
# Writes OUT_DIR/offline.json, online.json, serve.log and summary.json (online_over_offline per concurrency).
# Env: MODEL (default synthetic:llama-3.2-1b), NREQ (requests per level, 192), CONCURRENCY ("1 64"),
#      CLIENT_PROCS (bench-serve client processes; default one per 16 streams), PORT (8011), PYTHON (python3).
set -uo pipefail
OUT=$(mkdir -p "$1" && cd "$1" && pwd); MODEL=${2:-${MODEL:-synthetic:llama-3.2-1b}}
PORT=${PORT:-8011}; PY=${PYTHON:-python3}; CONC=${CONCURRENCY:-1 64}; export PYTHONUNBUFFERED=1
CLIENT=(); [ -n "${CLIENT_PROCS:-}" ] && CLIENT=(--client-procs "$CLIENT_PROCS")
# NOTE: both sides run the same closed loop (every slot filled at once, each request replaced as it
# ends): the offline bench's staggered first wave is off, and its untimed warm-up wave matches the
# online side's warm-up run below (every kernel shape compiled before the timed runs)
$PY -m kit.cli bench --model "$MODEL" --input-len 128 --output-len 64 --concurrency $CONC --no-stagger \
  --num-requests ${NREQ:-192} --out "$OUT/offline.json" 2>&1 | grep -v '%|' | tail -4
$PY -m kit.cli serve "$MODEL" --port "$PORT" --max-batch-size 64 --max-input-len 128 --max-seq-len 192 \
  --max-num-tokens 2048 > "$OUT/serve.log" 2>&1 &
SERVE_PID=$!
for _ in $(seq 1 240); do $PY -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=2)" "http://127.0.0.1:$PORT/health" 2>/dev/null && break; sleep 0.5; done
$PY -m kit.cli bench-serve --endpoint "http://127.0.0.1:$PORT" --input-len 128 --output-len 64 \
  --concurrency $CONC --num-requests 64 --seed 1000 "${CLIENT[@]}" --out "$OUT/online_warmup.json" > /dev/null 2>&1
$PY -m kit.cli bench-serve --endpoint "http://127.0.0.1:$PORT" --input-len 128 --output-len 64 \
  --concurrency $CONC --num-requests ${NREQ:-192} "${CLIENT[@]}" --out "$OUT/online.json" 2>&1 | grep -v '%|' | tail -4
kill -TERM "$SERVE_PID"; wait "$SERVE_PID"; echo "server exit status $?"
$PY - "$OUT" "$MODEL" <<'PY'
import importlib.util, json, os, sys
out, model = sys.argv[1], sys.argv[2]
off, on = (json.load(open(os.path.join(out, f))) for f in ("offline.json", "online.json"))
try:
    import torch
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
except ImportError:
    device = "unknown"
rows = []
for a, b in zip(off["runs"], on["runs"]):
    ka, kb = a["kit"], b["kit"]
    rows.append({"concurrency": ka["concurrency"], "offline_tok_s": round(ka["output_tokens_per_s"], 1),
                 "online_tok_s": round(kb["output_tokens_per_s"], 1),
                 "online_over_offline": round(kb["output_tokens_per_s"] / ka["output_tokens_per_s"], 3),
                 "offline_ttft_p50_ms": round(ka["ttft_ms"]["p50"], 1), "online_ttft_p50_ms": round(kb["ttft_ms"]["p50"], 1),
                 "offline_tpot_p50_ms": round(ka["tpot_ms"]["p50"], 2), "online_tpot_p50_ms": round(kb["tpot_ms"]["p50"], 2),
                 "client_procs": kb.get("client_procs"), "output_tokens": kb["output_tokens"],
                 "stream_chunks": kb.get("stream_chunks")})
have = {m: importlib.util.find_spec(m) is not None for m in ("uvloop", "httptools")}
summary = {"what": f"kit bench (offline, in-process) vs kit bench-serve (client processes over HTTP) against kit serve "
                   f"(engine in its own process), {model}, 128 prompt / 64 output tokens, "
                   f"{off['runs'][0]['kit']['num_requests']} requests per level, one run (bench/serve_vs_offline.sh)",
           "device": device, "server": {"uvicorn_loop": "uvloop" if have["uvloop"] else "asyncio",
                                        "uvicorn_http": "httptools" if have["httptools"] else "h11"},
           "summary": rows, "offline": off, "online": on}
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
for r in rows:
    print(f"c={r['concurrency']:<3} offline {r['offline_tok_s']:8.1f} tok/s  online {r['online_tok_s']:8.1f} tok/s  "
          f"online/offline {r['online_over_offline']:.3f}  TTFT p50 {r['offline_ttft_p50_ms']}/{r['online_ttft_p50_ms']} ms  "
          f"TPOT p50 {r['offline_tpot_p50_ms']}/{r['online_tpot_p50_ms']} ms  chunks/tokens "
          f"{r['stream_chunks']}/{r['output_tokens']}  client procs {r['client_procs']}")
print(f"wrote {os.path.join(out, 'summary.json')} ({summary['server']})")
PY
