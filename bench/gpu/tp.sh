#!/bin/bash
# Tensor-parallel workers as real processes on a 4-GPU machine
# (docs/tensor-parallelism.md; results in docs/benchmarks.md, "Tensor
# parallelism on four GPUs"). Runs over what `make bench-gpu-tp` staged in
# .device/tp (binary, tokenizer-only GGUF, a small splittable model, scripts):
#
# 1. Smoke test on a small random model that two GPUs can split
#    (tp-model.gguf, bench/gpu/tp_model_gguf.py): greedy outputs of
#    `tandem serve` at --tensor-parallel-size 1 (GPU 0) and 2 (GPUs 2-3), the
#    same weights; then two disaggregated deployments of it through `tandem
#    local`: prefill TP2 (GPUs 0-1) -> decode TP2 (GPUs 2-3) over cuda-ipc, and
#    prefill TP1 (GPU 0) -> decode TP2 (GPUs 2-3), where the prefill worker
#    declines cuda-ipc (unequal groups) and streams the KV over gRPC. Their
#    outputs are compared with serve TP2's (bench/gpu/greedy_probe.py).
#    Results: $OUT/smoke.tar.gz.
# 2. Goodput, 8B-shaped dummy model, 3000/150, Poisson rates, through
#    bench/gpu/goodput.sh: aggregated (2 x decode TP2, GPUs 0-1 and 2-3) vs
#    1 prefill TP2 (GPUs 0-1) + 1 decode TP2 (GPUs 2-3) over cuda-ipc and
#    gRPC. Every TP2 group has the same dummy weights (seed 0), so a greedy
#    probe after each deployment's warm-up must give the same tokens
#    everywhere (the KV each rank copied landed in the right rank).
#    Results: $OUT/goodput.tar.gz (`make goodput-report` reads it).
#
# Knobs (environment): SMOKE=0 skips part 1; CONFIGS, RATES_*, DURATION,
# TIME_LIMIT as for goodput.sh (TIME_LIMIT counts from the start of this
# script).
set -u
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-tp-out}
mkdir -p "$out"
started=$(date +%s)
elapsed() { echo $(($(date +%s) - started)); }
if [ -n "${TANDEM_BIN:-}" ]; then
  bin=$TANDEM_BIN
else
  bin=/tmp/tandem-tp
  gunzip -c "$here/tandem.gz" > "$bin" && chmod +x "$bin" || exit 1
fi
export TANDEM_BIN=$bin
probe="python3 $here/greedy_probe.py"
TP=${TP:-2}

smoke() {
  local dir
  dir=$(mktemp -d /tmp/tp-smoke.XXXXXX)
  local model=$here/tp-model.gguf
  local pids=()
  wait_up() { # NAME URL PID
    local t0
    t0=$(date +%s)
    until curl -sf "$2/health" > /dev/null; do
      if ! kill -0 "$3" 2>/dev/null || [ $(($(date +%s) - t0)) -gt 90 ]; then
        echo "$1: did not come up"; tail -5 "$dir/$1.log" "$dir/$1"/*.log 2>/dev/null
        return 1
      fi
      sleep 0.3
    done
    echo "$1: up in $(($(date +%s) - t0)) s (at $(elapsed) s)"
  }
  "$bin" serve --model "$model" --device cuda:0 --port 18201 > "$dir/serve-tp1.log" 2>&1 &
  pids+=($!)
  "$bin" serve --model "$model" --device cuda:2 --tensor-parallel-size "$TP" --port 18202 \
    > "$dir/serve-tp$TP.log" 2>&1 &
  pids+=($!)
  wait_up serve-tp1 http://127.0.0.1:18201 "${pids[0]}" \
    && $probe send http://127.0.0.1:18201 "$dir/serve-tp1.json"
  wait_up "serve-tp$TP" http://127.0.0.1:18202 "${pids[1]}" \
    && $probe send http://127.0.0.1:18202 "$dir/serve-tp$TP.json"
  kill -TERM "${pids[@]}" 2>/dev/null
  wait "${pids[@]}" 2>/dev/null
  $probe compare "$dir/serve-tp1.json" "$dir/serve-tp$TP.json" "serve TP1 vs serve TP$TP" \
    | tee -a "$dir/summary.jsonl"

  # local NAME PREFILL-ARGS DECODE-ARGS: 1P+1D of the small model.
  local_pair() {
    local name=$1
    "$bin" local --port 18203 --model "$model" --prefill 1 --decode 1 \
      --log-dir "$dir/$name" --endpoints-file "$dir/$name-endpoints.json" \
      --shutdown-grace-secs 5 --prefill-arg "$2" --decode-arg "$3" ${4:+--worker-arg "$4"} \
      > "$dir/$name.log" 2>&1 &
    local pid=$!
    if wait_up "$name" http://127.0.0.1:18203 "$pid"; then
      $probe send http://127.0.0.1:18203 "$dir/$name.json"
      local decode
      decode=$(python3 -c "import json,sys; print([p['http'] for p in json.load(open(sys.argv[1]))['processes'] if p['role']=='decode'][0])" "$dir/$name-endpoints.json")
      curl -s "http://$decode/metrics" > "$dir/$name-decode.prom"
      grep -E '^tandem_(kv_transfer_bytes_total|worker_prefills_total)' "$dir/$name-decode.prom" \
        | sed "s/^/$name decode: /"
      grep -h "KV transfer with this prefill worker\|cuda-ipc declined" "$dir/$name"/*.log \
        | sed 's/^[^ ]* *//' | sort | uniq -c | head -5 | cut -c1-400
      $probe compare "$dir/serve-tp$TP.json" "$dir/$name.json" "serve TP$TP vs $name" \
        | tee -a "$dir/summary.jsonl"
    fi
    kill -TERM "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
  }
  local_pair "ipc-tp$TP-tp$TP" "--device cuda:0 --tensor-parallel-size $TP" \
    "--device cuda:2 --tensor-parallel-size $TP" "--kv-transfer cuda-ipc"
  local_pair "auto-tp1-tp$TP" "--device cuda:0" "--device cuda:2 --tensor-parallel-size $TP"
  tar -C "$dir" -czf "$out/smoke.tar.gz" .
  echo "smoke test done at $(elapsed) s"
}

nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
[ "${SMOKE:-1}" = 0 ] || smoke

# Part 2: goodput.sh with tensor-parallel deployments. The device strings
# carry the TP flag (tandem local splits them on whitespace).
export GPUS=$((2 * TP))
export DEV0="cuda:0 --tensor-parallel-size $TP"
export DEV1="cuda:$TP --tensor-parallel-size $TP"
export AGG_DEVICE="cuda:{index*$TP} --tensor-parallel-size $TP"
export LABELS_JSON="{\"agg\": \"aggregated (2 × decode TP$TP)\", \"ipc\": \"disaggregated 1P TP$TP + 1D TP$TP, cuda-ipc\", \"grpc\": \"disaggregated 1P TP$TP + 1D TP$TP, gRPC\"}"
export TITLE="Goodput on $GPUS GPUs, TP$TP groups"
export WORKLOADS=${WORKLOADS:-"3000:150"}
export CONFIGS=${CONFIGS:-"agg ipc grpc"}
export RATES_agg_3000_150=${RATES_agg_3000_150:-"2 4 8"}
export RATES_ipc_3000_150=${RATES_ipc_3000_150:-"2 4 8"}
export RATES_grpc_3000_150=${RATES_grpc_3000_150:-"1"}
export PROBE="$probe send --prompts 4 --max-tokens 24"
export TIME_LIMIT=$((${TIME_LIMIT:-300} - $(elapsed)))
bash "$here/goodput.sh"
rm -rf /tmp/tp-probes && mkdir -p /tmp/tp-probes && tar -C /tmp/tp-probes -xzf "$out/goodput.tar.gz" 2>/dev/null
p=/tmp/tp-probes/results
for c in ipc grpc; do
  [ -f "$p/probe-agg.json" ] && [ -f "$p/probe-$c.json" ] \
    && $probe compare "$p/probe-agg.json" "$p/probe-$c.json" "8B dummy: agg TP$TP vs $c TP$TP"
done | tee "$out/probes.jsonl"
echo "tp.sh finished at $(elapsed) s"
