#!/usr/bin/env bash
# Builds the e2e control plane (kube-apiserver, kube-controller-manager, kube-scheduler,
# etcd, kwok) once and caches the binaries under ~/.cache/tandem/e2e/bin/<key>, where the key
# hashes e2e/controlplane/go.sum, the kwok version and the Go version: only the first
# run (or a version bump) pays for the build, later runs print the directory at once. Go's
# own build cache (~/.cache/go-build) makes a rebuild after a bump incremental.
# Prints the binary directory on stdout; progress goes to stderr.
set -euo pipefail

# Parsed whole before it runs (main, then exit on one line): editing this file during the long
# first build cannot make bash read a half-changed script.
main() {

root="$(cd "$(dirname "$0")/.." && pwd)"
module="$root/e2e/controlplane"
kwok_version="v0.8.0"
kube_version="$(sed -n 's/^[[:space:]]*k8s.io\/kubernetes \(v[0-9.]*\)$/\1/p' "$module/go.mod")"
[[ -n "$kube_version" ]] || { echo "e2e-build: no k8s.io/kubernetes version in $module/go.mod" >&2; exit 1; }
# The version the binaries report: `go build` leaves Kubernetes' version unset (v0.0.0-master),
# and clients that check it (helm's kubeVersion constraint) refuse such a cluster.
major="${kube_version#v}"; major="${major%%.*}"
minor="${kube_version#v*.}"; minor="${minor%%.*}"
version_pkg="k8s.io/component-base/version"
kube_ldflags="-s -w -X $version_pkg.gitVersion=$kube_version -X $version_pkg.gitMajor=$major -X $version_pkg.gitMinor=$minor -X $version_pkg.gitTreeState=clean -X $version_pkg.buildDate=1970-01-01T00:00:00Z"
key="$( { cat "$module/go.sum"; echo "kwok $kwok_version"; echo "$kube_ldflags"; go version; } | sha256sum | cut -c1-16)"
out="${TANDEM_E2E_CACHE:-$HOME/.cache/tandem/e2e}/bin/$key"
bins=(kube-apiserver kube-controller-manager kube-scheduler etcd kwok)

complete() {
  local b
  for b in "${bins[@]}"; do [[ -x "$out/$b" ]] || return 1; done
}

# kwok ships no default behaviour: its Stages (node initialize + lease heartbeat, pod
# ready/complete/delete, the set kwokctl uses) come from its module's kustomize/ tree.
stages() {
  [[ -s "$out/kwok-stages.yaml" ]] && return 0
  local dir f
  dir="$(GOFLAGS=-mod=mod go mod download -json "sigs.k8s.io/kwok@$kwok_version" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')"
  mkdir -p "$out"
  for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
    pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
    echo "---"
    cat "$dir/kustomize/stage/$f"
  done > "$out/kwok-stages.yaml.tmp"
  mv "$out/kwok-stages.yaml.tmp" "$out/kwok-stages.yaml"
}

if complete; then
  stages
  echo "$out"
  exit 0
fi

mkdir -p "$out"
# One build at a time: a second caller waits for the first instead of racing it.
exec 9>"$out.lock"
flock 9
if complete; then
  stages
  echo "$out"
  exit 0
fi

staging="$(mktemp -d "$out.build.XXXX")"
trap 'rm -rf "$staging"' EXIT
# -s -w: no symbol tables, a faster link; these binaries are never debugged here.
ldflags="-s -w"

start=$SECONDS
echo "e2e-build: building kube-apiserver, kube-controller-manager, kube-scheduler, etcd into $out (first run: long)" >&2
(cd "$module" && GOFLAGS=-mod=mod go build -ldflags="$kube_ldflags" -o "$staging/" \
  k8s.io/kubernetes/cmd/kube-apiserver \
  k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler \
  ./cmd/etcd)
echo "e2e-build: control plane built in $((SECONDS - start))s; building kwok $kwok_version" >&2
# kwok carries no replace directives, so `go install pkg@version` builds it with its own
# dependency graph (a newer client-go than the 1.35 control plane's).
GOBIN="$staging" GOFLAGS=-mod=mod go install -ldflags="$ldflags" "sigs.k8s.io/kwok/cmd/kwok@$kwok_version"
for b in "${bins[@]}"; do mv "$staging/$b" "$out/$b"; done
stages
echo "e2e-build: done in $((SECONDS - start))s" >&2
echo "$out"
}
main "$@"; exit
