#!/usr/bin/env bash
# `make e2e` / `make e2e-scale`: build what is missing, start a fresh control plane, run the
# suite (or the scale test) against it, stop the control plane, and print where the time
# went. Usage: hack/e2e-run.sh [suite|scale]
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
mode="${1:-suite}"
cargo="${CARGO:-cargo}"
target="${CARGO_TARGET_DIR:-$root/target}"
export E2E_DIR="${E2E_DIR:-$root/.cache/e2e}"
export E2E_ARTIFACTS="$E2E_DIR/artifacts"
export TANDEM_OPERATOR_BIN="$target/release/tandem-operator"
export KUBECTL="$root/.cache/bin/kubectl" HELM="$root/.cache/bin/helm"

phases=()
timed() {
  local name="$1" t0=$SECONDS
  shift
  "$@"
  phases+=("$(printf '  %-34s %5ds' "$name" $((SECONDS - t0)))")
}
report() {
  local rc=$?
  "$root/hack/e2e-cluster.sh" down || true
  echo "e2e: phases ($mode)"
  printf '%s\n' "${phases[@]}"
  echo "  (logs: $E2E_DIR/logs, operator logs and kubeconfigs: $E2E_ARTIFACTS)"
  exit $rc
}

# Parsed whole before it runs: editing this file during a run cannot derail it.
main() {
rm -rf "$E2E_ARTIFACTS"
mkdir -p "$E2E_ARTIFACTS"
timed "control-plane binaries" "$root/hack/e2e-build.sh" >/dev/null
timed "operator (cargo build --release)" "$cargo" build --release -q -p tandem-operator
timed "suite (go test -c)" bash -c "cd '$root/e2e/controlplane' && go test -c -o '$E2E_DIR/e2e.test' ./suite"
# A cluster left by an interrupted run is stopped first, so every run starts from empty etcd.
"$root/hack/e2e-cluster.sh" down
trap report EXIT
timed "control plane up" "$root/hack/e2e-cluster.sh" up
export KUBECONFIG="$E2E_DIR/kubeconfig"
case "$mode" in
  suite) timed "suite" "$E2E_DIR/e2e.test" -test.run '^TestE2E$' -test.v -test.count=1 -test.timeout 15m ;;
  scale) E2E_SCALE=1 timed "scale" "$E2E_DIR/e2e.test" -test.run '^TestScale$' -test.v -test.count=1 -test.timeout 40m ;;
  *) echo "usage: $0 [suite|scale]" >&2; exit 2 ;;
esac
}
main "$@"; exit
