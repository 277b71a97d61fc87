#!/bin/bash
# Runs on a 2-GPU machine, from the repository root, over what
# `make gpu-transfer-stage` staged in .device/cudaipc. The KV transfer between
# a prefill worker on GPU 0 and a decode worker on GPU 1 (then both on GPU 1):
# peer-copy ceiling, cuda-ipc and gRPC GB/s, and greedy tokens after a remote
# prefill equal to a local one, for an 8B shape and the SmolLM2 shape.
# Usage: bash .device/cudaipc/transfer.sh   (logs and JSON lines in $OUT or ./gpu-out)
set -u
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-gpu-out}
mkdir -p "$out"
bin=/tmp/tandem-transfer
gunzip -c "$here/tandem.gz" > "$bin" && chmod +x "$bin" || exit 1
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
nvidia-smi topo -m > "$out/topo.txt" 2>&1
git rev-parse HEAD > "$out/commit.txt" 2>/dev/null
status=0
for shape in llama3-8b smollm2-135m; do
  RUST_LOG=${RUST_LOG:-info} timeout 150 "$bin" gpu transfer-bench --shape "$shape" \
    --prefill-device cuda:0 --decode-device cuda:1 --same-gpu \
    --json "$out/transfer-$shape.jsonl" >"$out/transfer-$shape.out" 2>"$out/transfer-$shape.err"
  rc=$?
  echo "== $shape (exit $rc)"
  cat "$out/transfer-$shape.out"
  grep -E "WARN|ERROR|panicked" "$out/transfer-$shape.err" | head -20
  [ $rc -eq 0 ] || status=$rc
done
exit $status
