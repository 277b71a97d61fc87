#!/bin/bash
# Runs on the GPU machine, from the repository root, over what `make
# bench-constrained-gpu` staged in .device/gpu: the binary, a tokenizer-only
# GGUF of the default model padded to Llama 3's 128256 tokens, and these
# scripts. First the GPU checks on random models (the device sampler with
# grammar masks among them), then bench/constrained/run.sh on Llama-3-8B's
# shape with random weights. One call: the machine may not stay warm between
# two. Logs and JSON lines go to $OUT (or ./gpu-out).
set -u
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-gpu-out}
mkdir -p "$out"
bin=/tmp/tandem-gpu
gunzip -c "$here/tandem.gz" > "$bin" && chmod +x "$bin" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
status=0
if [ "${SKIP_CHECK:-0}" != 1 ]; then
  timeout 240 "$bin" gpu check 2>&1 | grep -v " INFO " | tee "$out/check.log"
  status=${PIPESTATUS[0]}
fi
OUT="$out/constrained" OUTPUT_LEN=${OUTPUT_LEN:-128} timeout 330 bash "$here/run.sh" "$bin" \
  --device cuda:0 --load-format dummy --dummy-shape llama3-8b --model "$here/tokenizer.gguf" \
  | tee "$out/constrained.jsonl"
# Every answer of the 8B-shaped model with random weights, sampled at
# temperature 1 under a nested schema, must parse and fit it.
port=18432
"$bin" serve --host 127.0.0.1 --port $port --device cuda:0 --load-format dummy \
  --dummy-shape llama3-8b --model "$here/tokenizer.gguf" > "$out/validate-serve.log" 2>&1 &
server=$!
for _ in $(seq 240); do
  curl -sf "http://127.0.0.1:$port/health" > /dev/null && break
  sleep 0.5
done
timeout 120 python3 "$here/validate.py" "http://127.0.0.1:$port" 20 | tee "$out/validate.jsonl"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
kill $server; wait $server 2>/dev/null
exit "$status"
