#!/usr/bin/env bash
# A real Kubernetes 1.35 control plane on loopback for the e2e suite, no containers:
# etcd, kube-apiserver (RBAC, service-account tokens with an issuer and signing key,
# admission with PodSecurity and ValidatingAdmissionPolicy/CEL), kube-controller-manager
# (garbage collector, StatefulSet/Deployment controllers, PV binder...), kube-scheduler, and
# kwok, which turns Nodes annotated `kwok.x-k8s.io/node=fake` into nodes whose pods become
# Running and Ready with IPs.
#
#   hack/e2e-cluster.sh up      start in the background, wait until usable, write a kubeconfig
#   hack/e2e-cluster.sh down    stop what `up` started (by the pids it recorded)
#   hack/e2e-cluster.sh env     print `export KUBECONFIG=...`
#
# State (certificates, etcd data, logs, pids, kubeconfig) lives in $E2E_DIR
# (default .cache/e2e). Ports: $E2E_PORT_BASE (default 27000) + 0..4.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
dir="${E2E_DIR:-$root/.cache/e2e}"
base="${E2E_PORT_BASE:-27000}"
etcd_port=$((base + 0)) etcd_peer_port=$((base + 1)) api_port=$((base + 2))
kcm_port=$((base + 3)) sched_port=$((base + 4))
nodes="${E2E_NODES:-4}"
kubeconfig="$dir/kubeconfig"
components=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok)

log() { echo "e2e-cluster: $*" >&2; }

running() {
  local pidfile="$dir/$1.pid"
  [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

down() {
  local c pid i
  # Reverse order: clients first, etcd last.
  for ((i = ${#components[@]} - 1; i >= 0; i--)); do
    c="${components[$i]}"
    if running "$c"; then
      pid="$(cat "$dir/$c.pid")"
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
      log "stopped $c ($pid)"
    fi
    rm -f "$dir/$c.pid"
  done
}

# Certificates: a CA, the apiserver's serving certificate for loopback and the in-cluster
# names, and the service-account signing key pair. Made once per state dir.
pki() {
  local pki="$dir/pki"
  [[ -f "$pki/sa.pub" ]] && return 0
  mkdir -p "$pki"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=tandem-e2e-ca" \
    -keyout "$pki/ca.key" -out "$pki/ca.crt" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" \
    -keyout "$pki/apiserver.key" -out "$pki/apiserver.csr" 2>/dev/null
  cat > "$pki/apiserver.ext" <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
EOF
  openssl x509 -req -in "$pki/apiserver.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
    -CAcreateserial -days 3650 -extfile "$pki/apiserver.ext" -out "$pki/apiserver.crt" 2>/dev/null
  openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
  openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
  # The admin identity of the harness, the controllers and kwok (system:masters).
  echo "$(openssl rand -hex 24),tandem-e2e-admin,tandem-e2e-admin,system:masters" > "$pki/tokens.csv"
  chmod 600 "$pki"/*.key "$pki/tokens.csv"
}

write_kubeconfig() {
  local token
  token="$(cut -d, -f1 "$dir/pki/tokens.csv")"
  cat > "$kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: tandem-e2e
  cluster:
    server: https://127.0.0.1:$api_port
    certificate-authority-data: $(base64 -w0 "$dir/pki/ca.crt")
users:
- name: tandem-e2e-admin
  user:
    token: $token
contexts:
- name: tandem-e2e
  context: {cluster: tandem-e2e, user: tandem-e2e-admin}
current-context: tandem-e2e
EOF
  chmod 600 "$kubeconfig"
}

start() {
  local name="$1"
  shift
  if running "$name"; then
    log "$name already running ($(cat "$dir/$name.pid"))"
    return 0
  fi
  # setsid: the component outlives this script and does not get the terminal's signals.
  setsid "$@" >"$dir/logs/$name.log" 2>&1 < /dev/null &
  echo $! > "$dir/$name.pid"
}

wait_for() {
  local what="$1" timeout="$2"
  shift 2
  local t0=$SECONDS
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS - t0 > timeout)); then
      log "$what not ready after ${timeout}s; see $dir/logs/"
      return 1
    fi
    sleep 0.5
  done
  log "$what ready ($((SECONDS - t0))s)"
}

nodes_yaml() {
  local i
  for ((i = 0; i < nodes; i++)); do
    cat <<EOF
---
apiVersion: v1
kind: Node
metadata:
  name: kwok-node-$i
  annotations:
    kwok.x-k8s.io/node: fake
  labels:
    kubernetes.io/hostname: kwok-node-$i
    kubernetes.io/os: linux
    type: kwok
    nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3
spec:
  podCIDR: 10.$((64 + i)).0.0/16
status:
  capacity: {cpu: "1000", memory: 8Ti, pods: "2000", nvidia.com/gpu: "1000"}
  allocatable: {cpu: "1000", memory: 8Ti, pods: "2000", nvidia.com/gpu: "1000"}
EOF
  done
}

up() {
  local bin
  bin="$("$root/hack/e2e-build.sh")"
  # A cluster starts empty: data of a stopped one is dropped.
  running etcd || rm -rf "$dir/etcd"
  mkdir -p "$dir/logs" "$dir/etcd"
  pki
  write_kubeconfig
  local t0=$SECONDS

  start etcd "$bin/etcd" --name e2e --data-dir "$dir/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer_port" \
    --initial-cluster "e2e=http://127.0.0.1:$etcd_peer_port" \
    --listen-metrics-urls "" --quota-backend-bytes 4294967296 --unsafe-no-fsync
  wait_for etcd 60 curl -sf "http://127.0.0.1:$etcd_port/health"

  local issuer="https://kubernetes.default.svc.cluster.local"
  start kube-apiserver "$bin/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" \
    --endpoint-reconciler-type none \
    --tls-cert-file "$dir/pki/apiserver.crt" --tls-private-key-file "$dir/pki/apiserver.key" \
    --client-ca-file "$dir/pki/ca.crt" \
    --token-auth-file "$dir/pki/tokens.csv" \
    --authorization-mode RBAC \
    --service-account-issuer "$issuer" --api-audiences "$issuer" \
    --service-account-key-file "$dir/pki/sa.pub" --service-account-signing-key-file "$dir/pki/sa.key" \
    --service-cluster-ip-range 10.96.0.0/16 \
    --enable-admission-plugins NamespaceLifecycle,LimitRanger,ServiceAccount,DefaultStorageClass,ResourceQuota,PodSecurity,ValidatingAdmissionPolicy,MutatingAdmissionWebhook,ValidatingAdmissionWebhook \
    --allow-privileged=true --profiling=false \
    --max-requests-inflight 1000 --max-mutating-requests-inflight 500
  wait_for kube-apiserver 180 env KUBECONFIG="$kubeconfig" "$root/.cache/bin/kubectl" get --raw /readyz

  local common=(--kubeconfig "$kubeconfig" --authentication-kubeconfig "$kubeconfig"
    --authorization-kubeconfig "$kubeconfig" --bind-address 127.0.0.1 --leader-elect=false
    --profiling=false)
  start kube-controller-manager "$bin/kube-controller-manager" "${common[@]}" --secure-port "$kcm_port" \
    --service-account-private-key-file "$dir/pki/sa.key" --root-ca-file "$dir/pki/ca.crt" \
    --controllers '*' --kube-api-qps 300 --kube-api-burst 600 \
    --concurrent-statefulset-syncs 20 --concurrent-gc-syncs 50 --pvclaimbinder-sync-period 1s
  start kube-scheduler "$bin/kube-scheduler" "${common[@]}" --secure-port "$sched_port" \
    --kube-api-qps 300 --kube-api-burst 600
  start kwok "$bin/kwok" --kubeconfig "$kubeconfig" --config "$bin/kwok-stages.yaml" \
    --manage-all-nodes=false --manage-nodes-with-annotation-selector kwok.x-k8s.io/node=fake \
    --cidr 10.128.0.1/10 --node-ip 127.0.0.2 --node-lease-duration-seconds 40
  wait_for kube-controller-manager 120 curl -skf "https://127.0.0.1:$kcm_port/healthz"
  wait_for kube-scheduler 120 curl -skf "https://127.0.0.1:$sched_port/healthz"

  nodes_yaml | KUBECONFIG="$kubeconfig" "$root/.cache/bin/kubectl" apply -f - >/dev/null
  wait_for "$nodes kwok nodes" 120 env KUBECONFIG="$kubeconfig" "$root/.cache/bin/kubectl" wait \
    --for=condition=Ready node -l type=kwok --timeout=1s
  log "up in $((SECONDS - t0))s: export KUBECONFIG=$kubeconfig"
}

# The whole command is parsed before it runs (main, then exit on the same line), so editing
# this file while a cluster starts cannot make bash read a half-changed script.
main() {
case "${1:-}" in
  up)
    "$root/hack/kube-tools.sh" >/dev/null
    # A failed start leaves nothing running behind it.
    trap 'rc=$?; if ((rc != 0)); then down; fi; exit $rc' EXIT
    up
    ;;
  down) down ;;
  env) echo "export KUBECONFIG=$kubeconfig" ;;
  *) echo "usage: $0 up|down|env" >&2; exit 2 ;;
esac
}
main "$@"; exit
