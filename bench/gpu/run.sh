#!/bin/bash
# Runs on the GPU machine, from the repository root, over what `make gpu-check`
# or `make bench-gpu` staged in .device/gpu (and the model's first part in
# .device/gpu-model). Usage: bash .device/gpu/run.sh check|bench|all
# Logs and JSON go to $OUT (or ./gpu-out).
set -u
what=${1:-all}
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-gpu-out}
mkdir -p "$out"
bin=/tmp/tandem-gpu
gunzip -c "$here/tandem.gz" > "$bin" && chmod +x "$bin" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
model=()
if [ -f "$here/default.gguf.part-b" ] && [ -f .device/gpu-model/default.gguf.part-a ]; then
  cat .device/gpu-model/default.gguf.part-a "$here/default.gguf.part-b" > /tmp/default.gguf
  model=(--model /tmp/default.gguf)
else
  echo "default model not staged: checking random models only"
fi
status=0
if [ "$what" = check ] || [ "$what" = all ]; then
  timeout 300 "$bin" gpu check "${model[@]}" 2>&1 | grep -v " INFO " | tee "$out/check.log"
  status=${PIPESTATUS[0]}
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  timeout 300 "$bin" gpu bench --json "$out/tandem_gpu_bench.json" 2>&1 | grep -v " INFO " | tee "$out/bench.log"
  if [ -f "$here/torch_baseline.py" ]; then
    # The PyTorch peer (bench/torch_baseline.py, staged by `make bench-gpu`) in the same call,
    # on the same card; its JSON lines go to torch.log.
    (cd "$out" && OUT=. PYTHONUNBUFFERED=1 timeout 300 python3 "$here/torch_baseline.py" 2>&1 \
      | grep '^{' | tee torch.log)
  fi
fi
exit "$status"
