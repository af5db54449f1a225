#!/usr/bin/env bash
# Run the image tests and benchmark against pillow-simd, in a venv of their own.
#
#   scripts/test-images-pillow-simd.sh [bench args, e.g. --check]
#
# pillow-simd ships as an sdist only and pip silently puts stock Pillow back whenever a
# dependency asks for `pillow`, so it cannot live in .venv next to llama-cpp-python and
# friends. This builds .venv-simd (git-ignored) with only what server.images and its tests
# import, swaps Pillow for pillow-simd (AVX2 when the CPU has it), checks that the swap took,
# then runs tests/test_images.py and `python -m bench.images` there (with .venv's stock
# Pillow as the baseline when .venv exists). Idempotent: a second run finds everything in
# place and goes straight to the tests.
#
# Env: VENV_SIMD (default .venv-simd), PYTHON (default python3),
#      PILLOW_SIMD_VERSION (default 12.1.1.post0), PILLOW_SIMD_AVX2=0 to build SSE4 only.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV="${VENV_SIMD:-.venv-simd}"
PYTHON="${PYTHON:-python3}"
SIMD_VERSION="${PILLOW_SIMD_VERSION:-12.1.1.post0}"
# What server.images and tests/test_images.py import, besides Pillow; pytest-timeout
# because pyproject's pytest options name it.
DEPS=(pytest pytest-timeout "numpy>=1.24" "pybase64>=1.3" simplejpeg)

log() { printf '== %s\n' "$*"; }

# --- system build dependencies (Debian/Ubuntu) ---------------------------------------------
missing=()
for pkg in libjpeg-dev zlib1g-dev libwebp-dev; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$pkg")
done
command -v cc >/dev/null || missing+=(build-essential)
"$PYTHON" -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
    || missing+=(python3-dev)
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "missing build dependencies; run: sudo apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
    log "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- the venv -------------------------------------------------------------------------------
if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
pip() { "$PY" -m pip --disable-pip-version-check -q "$@"; }

if ! "$PY" -c 'import pytest, pytest_timeout, numpy, pybase64, simplejpeg' 2>/dev/null; then
    log "installing ${DEPS[*]}"
    pip install "${DEPS[@]}"
fi

# The project itself, editable and without its dependencies (no llama-cpp-python here).
if ! "$PY" -c 'import pathlib, sys, server
sys.exit(pathlib.Path(server.__file__).resolve().parent != pathlib.Path("server").resolve())' \
    2>/dev/null; then
    log "installing vlserve (editable, --no-deps)"
    pip install --no-deps -e .
fi

is_simd() { "$PY" -c 'import re, sys, PIL
sys.exit(not re.search(r"\.post\d+$", PIL.__version__))' 2>/dev/null; }

if ! is_simd; then
    # Anything above may have pulled stock Pillow in; take it out, then build pillow-simd.
    pip uninstall -y pillow pillow-simd >/dev/null 2>&1 || true
    cc_flags=""
    if [[ "${PILLOW_SIMD_AVX2:-1}" != 0 ]] && grep -qw avx2 /proc/cpuinfo 2>/dev/null; then
        cc_flags="-mavx2"
    fi
    log "building pillow-simd==$SIMD_VERSION from source (CC=cc $cc_flags)"
    # No wheel cache: a cached build would ignore a change of CC flags.
    CC="cc $cc_flags" pip install --no-deps --no-cache-dir --no-binary pillow-simd \
        "pillow-simd==$SIMD_VERSION"
fi

# --- checks, tests, benchmark -------------------------------------------------------------
"$PY" - <<'EOF'
from server.images import image_backend_info

info = image_backend_info()
print("== backend:", info)
assert info["pillow_simd"], f"expected pillow-simd, got Pillow {info['pillow_version']}"
assert info["simplejpeg"] and info["jpeg_path"] == "simplejpeg-scaled", info
EOF

log "tests/test_images.py"
# --noconftest: a conftest may import the engine (llama_cpp), which this venv lacks.
"$PY" -m pytest tests/test_images.py -q -p no:cacheprovider --noconftest

# The goals compare with the naive path on stock Pillow: time it in .venv when there is one.
bench_args=()
if [[ -x .venv/bin/python ]] && .venv/bin/python -c 'import re, sys, PIL
sys.exit(bool(re.search(r"\.post\d+$", PIL.__version__)))' 2>/dev/null; then
    bench_args=(--baseline-python .venv/bin/python)
fi
log "python -m bench.images ${bench_args[*]} $*"
"$PY" -m bench.images "${bench_args[@]}" "$@"
