# syntax=docker/dockerfile:1
# vlserve image. A build stage compiles llama-cpp-python (CUDA or CPU) and pillow-simd into
# a venv; a slim runtime stage runs `vlserve serve` as a non-root user on port 7860.
#
#   GPU (default): docker build -t vlserve:cuda .
#   CPU only:      docker build --build-arg VARIANT=cpu -t vlserve:cpu .
#
# Run commands are in the README ("Docker"). Docker cannot run where this was written: CI
# lints this file with hadolint and checks it with tests/test_dockerfile.py; it has not been
# built.

ARG VARIANT=cuda
ARG UBUNTU_VERSION=24.04
# The host's NVIDIA driver must support this CUDA version (driver >= 570 for 12.8).
ARG CUDA_VERSION=12.8.1

# One base image per variant and stage; VARIANT picks a pair below.
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu${UBUNTU_VERSION} AS build-cuda
FROM ubuntu:${UBUNTU_VERSION} AS build-cpu
FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${UBUNTU_VERSION} AS runtime-cuda
FROM ubuntu:${UBUNTU_VERSION} AS runtime-cpu

# ---------------------------------------------------------------------------- build
# hadolint ignore=DL3006
FROM build-${VARIANT} AS build
ARG VARIANT
# GPU generations to compile kernels for: T4 75, A100 80, A10/RTX 3090 86, L4/RTX 4090 89,
# H100 90. Fewer builds faster.
ARG CUDA_ARCHITECTURES="75;80;86;89;90"
ARG PILLOW_SIMD_VERSION=12.1.1.post0
# AVX2 resize and colour-conversion kernels (any x86-64 server CPU since about 2014).
ARG PILLOW_SIMD_CFLAGS="-mavx2"
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Distribution versions are not pinned: the base image tag pins the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        build-essential cmake git python3 python3-dev python3-venv \
        libjpeg-turbo8-dev zlib1g-dev libwebp-dev \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server ./server

# llama-cpp-python compiles llama.cpp here. CUDA: kernels for CUDA_ARCHITECTURES, linked
# against the devel image's driver stub (the host's driver is used at run time).
# GGML_NATIVE=off: the image must run on other CPUs than the build machine's. The check
# fails the build if the CUDA backend is missing (such a build runs on the CPU silently).
# The cluster extra adds vllm-router (a 70 MB binary): deploy/kubernetes/ runs the router
# from this same image. DL3013 takes ".[cluster]" for an unpinned package: it is this
# project (its pins are in pyproject.toml).
# hadolint ignore=DL3013
RUN if [ "$VARIANT" = "cuda" ]; then \
        export CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES} -DGGML_NATIVE=off -DCMAKE_EXE_LINKER_FLAGS=-Wl,--allow-shlib-undefined"; \
    else \
        export CMAKE_ARGS="-DGGML_CUDA=off -DGGML_NATIVE=off"; \
    fi \
    && pip install --no-cache-dir ".[cluster]" \
    && if [ "$VARIANT" = "cuda" ]; then \
        test -n "$(find /opt/venv -name 'libggml-cuda.so*' -print -quit)"; \
    fi

# pillow-simd replaces pillow (the same PIL package with SIMD resizing), built from source
# against libjpeg-turbo.
RUN pip uninstall -y pillow \
    && CC="cc ${PILLOW_SIMD_CFLAGS}" pip install --no-cache-dir --no-binary pillow-simd \
        "pillow-simd==${PILLOW_SIMD_VERSION}"

# -------------------------------------------------------------------------- runtime
# hadolint ignore=DL3006
FROM runtime-${VARIANT} AS runtime
# ARG, not ENV: only apt-get needs it, the running container should not carry it.
ARG DEBIAN_FRONTEND=noninteractive

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 libgomp1 libjpeg-turbo8 zlib1g libwebp7 libwebpdemux2 libwebpmux3 \
        nginx \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 vlserve \
    && useradd --system --create-home --uid 10001 --gid 10001 vlserve

COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY configs ./configs
COPY models/registry.yaml ./registry.yaml
COPY scripts/healthcheck.py ./scripts/
# The volumes start out owned by the server's user (named volumes copy this): models, and
# data: batches (batch_dir: batch files, state and results, resumed after a restart) and
# state.json (VLSERVE_STATE_SNAPSHOT below).
RUN mkdir -p /app/models /app/data/batches && chown -R vlserve:vlserve /app/models /app/data

# Configuration by environment: VLSERVE_CONFIG picks the preset, any VLSERVE_* setting
# overrides it (e.g. VLSERVE_API_KEY, VLSERVE_N_CTX). 0.0.0.0 on purpose: the container's
# port is what gets published. MALLOC_ARENA_MAX=2: with glibc's default arena per thread,
# the soak saw RSS creep for a minute (+4 % after warm-up); with 2 it stays flat (+0.4 %).
# VLSERVE_STATE_SNAPSHOT: stored responses and conversations kept on the data volume across
# restarts and crashes (written every state_snapshot_interval_s; empty turns it off).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MALLOC_ARENA_MAX=2 \
    VLSERVE_CONFIG=configs/youtu-vl-4b.yaml \
    VLSERVE_HOST=0.0.0.0 \
    VLSERVE_PORT=7860 \
    VLSERVE_REGISTRY=/app/registry.yaml \
    VLSERVE_STATE_SNAPSHOT=/app/data/state.json

VOLUME ["/app/models", "/app/data"]
# Numeric, so orchestrators can check it is not root without reading /etc/passwd.
USER 10001:10001
EXPOSE 7860
# 200 only after the model is loaded and warmed up: allow for loading a multi-GB model.
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "/app/scripts/healthcheck.py"]
# SIGTERM drains in-flight requests (drain_timeout, 30 s), then writes the state snapshot:
# run with --stop-timeout 60.
STOPSIGNAL SIGTERM
ENTRYPOINT ["vlserve"]
CMD ["serve"]
