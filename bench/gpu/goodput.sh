#!/bin/bash
# Goodput on two GPUs: aggregated (a decode worker per GPU, each prefilling
# its own prompts, behind one frontend with the kv router) vs disaggregated
# (1 prefill GPU + 1 decode GPU) over cuda-ipc and over gRPC, with an
# 8B-shaped model of random weights, Poisson arrivals at increasing rates.
#
# Runs on the GPU machine from the repository root over what `make
# bench-gpu-goodput` staged in .device/goodput (binary, tokenizer-only GGUF,
# this script); every `tandem bench` JSON, the logs and the workers' metrics
# go into $OUT/goodput.tar.gz. `make goodput-report` turns them into the
# tables and plot of docs/benchmarks.md.
#
# Everything is an environment variable, so the same script runs here on the
# CPU with a tiny shape (see mk/goodput.mk, `goodput-cpu-test`):
#   SHAPE        dummy shape (llama3-8b)
#   DEV0 DEV1    the two devices of the disaggregated runs (cuda:0 cuda:1)
#   AGG_DEVICE   the aggregated workers' (cuda:{index}: decode-N on GPU N)
#   WORKLOADS    input:output pairs ("3000:150 1000:300")
#   CONFIGS      which configurations, in order ("agg ipc grpc")
#   RATES_<config>_<input>_<output>  offered rates, ascending
#   DURATION     seconds of sending per run (8); DRAIN seconds a run may
#                drain before its last requests are cut off (3)
#   CALIB_N      light-load requests per workload, one at a time (4)
#   TIME_LIMIT   seconds after which no new run starts (340)
#   ENGINE_ARGS  engine flags of every worker (vLLM's H100 defaults)
#   WARMUP_ARGS  `tandem bench` flags of the unmeasured warm-up per deployment
#                and workload (its --input-len is the workload's)
#   GPUS         GPUs of every deployment, for tokens/s per GPU (2)
#   LABELS_JSON  the report's names of the configurations ({}: its own)
#   TITLE        the report's plot title
#   PROBE        a command run with the frontend's URL and a results file
#                once a deployment is warm (bench/gpu/tp.sh: greedy outputs)
set -u
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-goodput-out}
mkdir -p "$out"
work=$(mktemp -d /tmp/goodput.XXXXXX)
res=$work/results
mkdir -p "$res" "$work/logs"
started=$(date +%s)
elapsed() { echo $(($(date +%s) - started)); }

if [ -n "${TANDEM_BIN:-}" ]; then
  bin=$TANDEM_BIN
else
  bin=/tmp/tandem-goodput
  gunzip -c "$here/tandem.gz" > "$bin" && chmod +x "$bin" || exit 1
fi
tok=${TOKENIZER:-$here/tokenizer.gguf}
SHAPE=${SHAPE:-llama3-8b}
DEV0=${DEV0:-cuda:0}
DEV1=${DEV1:-cuda:1}
# The aggregated decode workers' device; {index} is each one's index.
AGG_DEVICE=${AGG_DEVICE:-"cuda:{index}"}
WORKLOADS=${WORKLOADS:-"3000:150 1000:300"}
CONFIGS=${CONFIGS:-"agg ipc grpc"}
DURATION=${DURATION:-8}
DRAIN=${DRAIN:-3}
CALIB_N=${CALIB_N:-4}
TIME_LIMIT=${TIME_LIMIT:-340}
PORT=${PORT:-18000}
# vLLM's defaults on an H100 for its OpenAI server: chunked prefill with an
# 8192-token step budget, decodes scheduled first (max_num_seqs 1024 there;
# 256 here never binds at these loads).
ENGINE_ARGS=${ENGINE_ARGS:-"--max-batch-tokens 8192 --max-num-seqs 256"}
IPC_TRANSFER=${IPC_TRANSFER:-cuda-ipc}
WARMUP_ARGS=${WARMUP_ARGS:-"--concurrency 32 --num-requests 32 --output-len 24"}
# Decode workers' --remote-prefill-min-tokens; empty: their default (256).
REMOTE_MIN=${REMOTE_MIN:-}
dummy="--load-format dummy --dummy-shape $SHAPE"

: "${RATES_agg_3000_150:=1.5 3 4.5 6 9 12}"
: "${RATES_ipc_3000_150:=1.5 3 4.5 6 9 12}"
: "${RATES_grpc_3000_150:=0.5 1 2}"
: "${RATES_agg_1000_300:=8 16 24}"
: "${RATES_ipc_1000_300:=8 16 24}"
: "${RATES_grpc_1000_300:=1 3}"

{
  echo "started $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=index,name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  nvidia-smi topo -m 2>&1
  nproc
  "$bin" --version
} > "$res/machine.txt"
cat "$res/machine.txt"
cat > "$res/params.json" <<EOF
{"shape": "$SHAPE", "duration_s": $DURATION, "drain_s": $DRAIN, "calib_n": $CALIB_N,
 "engine_args": "$ENGINE_ARGS", "ipc_transfer": "$IPC_TRANSFER", "remote_min": "$REMOTE_MIN",
 "gpus": ${GPUS:-2}, "seed_per_run": true, "labels": ${LABELS_JSON:-{\}},
 "title": "${TITLE:-Goodput on two GPUs}"}
EOF

local_pid=
stop_deployment() {
  if [ -n "$local_pid" ]; then
    kill -TERM "$local_pid" 2>/dev/null
    wait "$local_pid" 2>/dev/null
    local_pid=
  fi
}
trap stop_deployment EXIT

# start_deployment NAME PREFILL DECODE tandem-local-args...
start_deployment() {
  local name=$1 prefill=$2 decode=$3
  shift 3
  local endpoints=$work/$name-endpoints.json
  "$bin" local --port "$PORT" --model "$tok" --prefill "$prefill" --decode "$decode" \
    --endpoints-file "$endpoints" --log-dir "$work/logs/$name" --shutdown-grace-secs 5 \
    --worker-arg "$dummy $ENGINE_ARGS" ${REMOTE_MIN:+--remote-prefill-min-tokens "$REMOTE_MIN"} \
    "$@" > "$work/logs/$name-local.log" 2>&1 &
  local_pid=$!
  local t0
  t0=$(date +%s)
  until curl -sf "http://127.0.0.1:$PORT/health" > /dev/null; do
    if ! kill -0 "$local_pid" 2>/dev/null || [ $(($(date +%s) - t0)) -gt 150 ]; then
      echo "$name: did not come up"; tail -20 "$work/logs/$name-local.log"
      tail -5 "$work"/logs/"$name"/*.log
      local_pid=
      return 1
    fi
    sleep 0.5
  done
  echo "$name: up in $(($(date +%s) - t0)) s (at $(elapsed) s)"
  cp "$endpoints" "$res/$name-endpoints.json"
  # Warm-up, not measured: first prefills and transfers, and the decode CUDA
  # graphs of batches up to 32 at each workload's context length (a graph is
  # captured the first time a batch-size bucket meets a context-length bucket).
  for wl in $WORKLOADS; do
    # shellcheck disable=SC2086
    "$bin" bench --url "http://127.0.0.1:$PORT" --endpoint completions --quiet --seed 99 \
      --input-len "${wl%:*}" $WARMUP_ARGS | sed -n "1s/^/$name warm-up ${wl%:*}: /p"
  done
  if [ -n "${PROBE:-}" ]; then
    $PROBE "http://127.0.0.1:$PORT" "$res/probe-$name.json" 2>&1 | sed "s/^/$name probe: /"
  fi
}

# Every worker's and the frontend's /metrics, for the transfer and prefill counts.
scrape() {
  local name=$1 tag=$2
  python3 - "$work/$name-endpoints.json" > "$work/addrs.txt" <<'EOF'
import json, sys
for p in json.load(open(sys.argv[1]))["processes"]:
    print(f"{p['role']}-{p['index']} {p['http']}")
EOF
  while read -r proc addr; do
    curl -s "http://$addr/metrics" > "$res/$name-$tag-$proc.prom"
  done < "$work/addrs.txt"
}

# sample FILE: "epoch-seconds process metric value" lines until killed.
sample() {
  while true; do
    while read -r proc addr; do
      curl -s "http://$addr/metrics" | grep -E '^tandem_worker_(queue_depth|running_sequences)' \
        | sed "s/^/$(date +%s.%N) $proc /"
    done < "$work/addrs.txt"
    sleep 0.1
  done > "$1"
}

# run_rates NAME INPUT OUTPUT: each rate of RATES_<name>_<in>_<out>, stopping
# after a run that is deep in overload (higher rates would only be worse).
run_rates() {
  local name=$1 in=$2 outlen=$3 var="RATES_$1_$2_$3"
  for rate in ${!var}; do
    if [ $(($(elapsed) + DURATION + DRAIN + 5)) -gt "$TIME_LIMIT" ]; then
      echo "$name $in/$outlen rate $rate: skipped, out of time"
      return
    fi
    # A seed of its own per run: the same seed would send the same prompts
    # again, and the deployment would find them in its prefix cache.
    local json=$res/run-$name-$in-$outlen-$rate.json
    scrape "$name" "$in-$outlen-$rate-pre"
    # Every worker's queue depth and running sequences, 10 times a second.
    sample "$res/samples-$name-$in-$outlen-$rate.txt" &
    local sampler=$!
    "$bin" bench --url "http://127.0.0.1:$PORT" --endpoint completions --quiet \
      --rate "$rate" --duration "$DURATION" --drain-timeout "$DRAIN" \
      --input-len "$in" --output-len "$outlen" --seed "$in$outlen${rate//./}" --json "$json" \
      > "$work/logs/bench-$name-$in-$outlen-$rate.txt" 2>&1
    python3 - "$json" "$name $in/$outlen rate $rate" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
t, i = r.get("ttft") or {}, r.get("itl") or {}
print(f"{sys.argv[2]:>28}: {r['succeeded']}/{r['requests']} ok, "
      f"TTFT p50 {t.get('p50_ms', 0):.0f} p90 {t.get('p90_ms', 0):.0f} ms, "
      f"ITL p50 {i.get('p50_ms', 0):.1f} p90 {i.get('p90_ms', 0):.1f} ms, "
      f"{r['output_tokens_per_s']:.0f} tok/s")
overloaded = r["requests"] > 0 and (r["errors"] > 0.3 * r["requests"] or t.get("p50_ms", 1e9) > 4000)
sys.exit(1 if overloaded else 0)
EOF
    local overloaded=$?
    kill "$sampler" 2>/dev/null
    wait "$sampler" 2>/dev/null
    scrape "$name" "$in-$outlen-$rate-post"
    [ "$overloaded" = 0 ] || return
  done
}

run_config() {
  local name=$1
  if [ $(($(elapsed) + 60)) -gt "$TIME_LIMIT" ]; then
    echo "$name: skipped, out of time"
    return
  fi
  case $name in
    agg) start_deployment agg 0 2 --decode-arg "--device $AGG_DEVICE" ;;
    ipc) start_deployment ipc 1 1 --worker-arg "--kv-transfer $IPC_TRANSFER" \
           --prefill-arg "--device $DEV0" --decode-arg "--device $DEV1" ;;
    # The same, but the decode worker never prefills locally: every prompt
    # waits for the prefill worker (pure disaggregation).
    ipcpure) start_deployment ipcpure 1 1 --worker-arg "--kv-transfer $IPC_TRANSFER" \
           --prefill-arg "--device $DEV0" --decode-arg "--device $DEV1 --prefill-max-queue 1000000" ;;
    grpc) start_deployment grpc 1 1 --worker-arg "--kv-transfer grpc" \
           --prefill-arg "--device $DEV0" --decode-arg "--device $DEV1" ;;
  esac || return
  if [ "$name" = agg ]; then
    # Light load, one request at a time: what the hardware does for a lone
    # request through the whole stack; the SLOs are multiples of it.
    for wl in $WORKLOADS; do
      "$bin" bench --url "http://127.0.0.1:$PORT" --endpoint completions --quiet \
        --concurrency 1 --num-requests "$CALIB_N" --input-len "${wl%:*}" --output-len "${wl#*:}" \
        --seed 7 --json "$res/calib-${wl%:*}-${wl#*:}.json" | sed -n '1p;/^TTFT/p;/^ITL/p'
    done
  fi
  for wl in $WORKLOADS; do
    run_rates "$name" "${wl%:*}" "${wl#*:}"
  done
  stop_deployment
}

# Packs what is there so far: a call killed at its time limit still returns
# the configurations that finished.
pack() {
  rm -rf "$res/logs" && cp -r "$work/logs" "$res/logs"
  tar -C "$work" -czf "$out/goodput.tar.gz.tmp" results && mv "$out/goodput.tar.gz.tmp" "$out/goodput.tar.gz"
}

for config in $CONFIGS; do
  run_config "$config"
  pack
done
echo "finished at $(elapsed) s"
ls -la "$out"
