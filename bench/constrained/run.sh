#!/bin/bash
# Decode speed with and without a JSON-schema constraint, through the HTTP
# server, same server process, back to back: `tandem bench` at concurrency
# 1 (and 8), every request generating OUTPUT_LEN tokens (ignore_eos; the
# schema's item array is unbounded, so the grammar never ends early).
# Usage: bench/constrained/run.sh TANDEM_BIN [serve args...]
# Prints one JSON line per run: {"constrained", "concurrency", "itl_mean_ms", ...}.
set -eu
bin=$1; shift
here=$(cd "$(dirname "$0")" && pwd)
port=${PORT:-18431}
out=${OUT:-/tmp/constrained-bench}
mkdir -p "$out"
"$bin" serve --host 127.0.0.1 --port "$port" "$@" > "$out/serve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null' EXIT
for _ in $(seq 600); do
  curl -sf "http://127.0.0.1:$port/health" > /dev/null && break
  kill -0 $server 2>/dev/null || { tail -20 "$out/serve.log"; exit 1; }
  sleep 0.5
done
input=${INPUT_LEN:-256}
output=${OUTPUT_LEN:-128}
requests=${REQUESTS:-8}
for conc in ${CONCURRENCY:-1 8}; do
  for mode in plain schema plain schema; do
    extra=()
    [ "$mode" = schema ] && extra=(--extra-body "@$here/schema.json")
    json="$out/$mode-c$conc.json"
    "$bin" bench --url "http://127.0.0.1:$port" --endpoint chat --quiet \
      --concurrency "$conc" --num-requests $((requests * conc)) \
      --input-len "$input" --output-len "$output" --json "$json" "${extra[@]}" > "$out/$mode-c$conc.log"
    python3 - "$json" "$mode" "$conc" <<'PY'
import json, statistics, sys
report = json.load(open(sys.argv[1]))
reqs = [r for r in report["records"] if not r.get("error")]
gaps = [g for r in reqs for g in r["itl_ms"]]
print(json.dumps({
    "constrained": sys.argv[2] == "schema", "concurrency": int(sys.argv[3]),
    "ok": len(reqs), "failed": len(report["records"]) - len(reqs),
    "itl_mean_ms": round(statistics.mean(gaps), 3),
    "itl_median_ms": round(statistics.median(gaps), 3),
    "ttft_median_ms": round(statistics.median(r["ttft_ms"] for r in reqs), 2),
}))
PY
  done
done
