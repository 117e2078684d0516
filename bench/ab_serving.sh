#!/usr/bin/env bash
# A/B serving regression on one GPU, in one run: the same `kit bench` workloads and the bf16
# parity test on two source trees (e.g. a commit before a refactor and the tree after it),
# interleaved A, B, A, B so that drift of the machine shows up as A-vs-A spread.
#   bash bench/ab_serving.sh BEFORE_TREE AFTER_TREE OUT_DIR
# MODELS (default: "synthetic:llama-3.2-1b smollm2-135m") picks the models; PARITY=0 skips the
# bf16 parity test (it needs SmolLM2).
set -uo pipefail
A=$(cd "$1" && pwd); B=$(cd "$2" && pwd); OUT=$(mkdir -p "$3" && cd "$3" && pwd)
export KIT_CACHE_DIR=${KIT_CACHE_DIR:-/tmp/kit-cache} PYTHONUNBUFFERED=1
run() {  # tree label round
  local tree=$1 label=$2 round=$3
  ( cd "$tree" && export PYTHONPATH="$tree${PYTHONPATH:+:$PYTHONPATH}"
    if [ "$round" = 1 ] && [ "${PARITY:-1}" = 1 ]; then
      KIT_GPU_RESULTS="$OUT" python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py \
        -k bf16_logits 2>&1 | tail -3
      mv -f "$OUT/bf16_parity.json" "$OUT/bf16_parity_$label.json" 2>/dev/null
    fi
    for model in ${MODELS:-synthetic:llama-3.2-1b smollm2-135m}; do
      python3 -m kit.cli bench --model "$model" --input-len 128 --output-len 128 --concurrency 1 8 64 \
        --out "$OUT/bench_${label}_r${round}_${model#synthetic:}.json" 2>&1 | grep -v '%|' | tail -5
    done )
}
for round in 1 2; do run "$A" before "$round"; run "$B" after "$round"; done
python3 - "$OUT" <<'PY'
import glob, json, os, sys
out = sys.argv[1]; rows = {}
for f in sorted(glob.glob(os.path.join(out, "bench_*_r*_*.json"))):
    label, rnd, model = os.path.basename(f)[6:-5].split("_", 2)
    for run in json.load(open(f))["runs"]:
        k = run["kit"]; key = (model, k["concurrency"])
        rows.setdefault(key, {}).setdefault(label, []).append(k["output_tokens_per_s"])
summary = []
for (model, c), d in sorted(rows.items()):
    b, a = max(d.get("before", [0])), max(d.get("after", [0]))
    summary.append({"model": model, "concurrency": c, "before_tok_s": d.get("before"), "after_tok_s": d.get("after"),
                    "after_over_before_best": a / b if b else None})
    print(f"{model:>14} c={c:<3} before {d.get('before')} after {d.get('after')} ratio(best) {a / b if b else 0:.3f}")
json.dump(summary, open(os.path.join(out, "ab_summary.json"), "w"), indent=2)
PY
