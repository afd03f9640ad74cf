# syntax=docker/dockerfile:1
# One image for edgeloom-operator, kubectl-edgeloom, edgeloom-agent and edgeloom-runner,
# with libtorch (CPU + CUDA) from the torch wheel on PyPI. Multi-stage: the build stage has
# Rust and Python; the runtime stage is Debian slim, runs as a non-root user (65532), and
# holds only the binaries and libtorch's shared libraries.
#
#   docker build -t ghcr.io/edgeloom/edgeloom:0.1.0 .
#
# The chart runs `edgeloom-operator` (Deployment) and `edgeloom-agent` (DaemonSet) from it.
# No container engine runs in this project's CI; the binaries it builds are the ones the
# tests build (`cargo build --release --locked`), against the same torch version.

ARG RUST_VERSION=1.89
ARG TORCH_VERSION=2.11.0

FROM rust:${RUST_VERSION}-bookworm AS build
ARG TORCH_VERSION
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/*
# libtorch from PyPI (tch 0.24 pairs with torch 2.11.0 exactly).
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir "torch==${TORCH_VERSION}"
WORKDIR /src
COPY . .
# Keep the wheel's layout under /opt/torch: libtorch_cuda.so finds the CUDA libraries of
# the nvidia-* wheels through its RUNPATH ($ORIGIN/../../nvidia/...).
RUN SITE=$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') \
 && export LIBTORCH="$SITE/torch" \
 && cargo build --release --locked \
      -p edgeloom-operator -p edgeloom-agent -p edgeloom-runner --bins \
 && mkdir -p /out/bin /opt/torch/site-packages/torch \
 && cp target/release/edgeloom-operator target/release/kubectl-edgeloom \
       target/release/edgeloom-agent target/release/edgeloom-runner /out/bin/ \
 && cp -a "$SITE/torch/lib" /opt/torch/site-packages/torch/lib \
 && if [ -d "$SITE/nvidia" ]; then cp -a "$SITE/nvidia" /opt/torch/site-packages/nvidia; fi

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 65532 edgeloom \
 && useradd --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin edgeloom
COPY --from=build /opt/torch /opt/torch
COPY --from=build /out/bin/ /usr/local/bin/
# The runner finds libtorch here (the chart prepends the host's NVIDIA library path).
ENV LD_LIBRARY_PATH=/opt/torch/site-packages/torch/lib
USER 65532:65532
CMD ["edgeloom-operator"]
