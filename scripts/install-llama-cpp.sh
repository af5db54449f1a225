#!/usr/bin/env bash
# Install llama-cpp-python, the one dependency that compiles (llama.cpp, C++), into a venv,
# saying what happens instead of leaving a newcomer at a silent prompt for minutes.
#
#   scripts/install-llama-cpp.sh VENV            install the version pinned in pyproject.toml
#   scripts/install-llama-cpp.sh --progress      filter: `pip install -v` output -> progress lines
#
# CMAKE_ARGS (e.g. "-DGGML_CUDA=on") forces a fresh build: pip's wheel cache would otherwise
# hand back the build it made before, whatever CMAKE_ARGS says.
set -euo pipefail

progress() {
  # Ninja's verbose lines are "[12/160] /usr/bin/g++ ... -o path/to/file.cpp.o -c ...":
  # keep the counter and the file; scikit-build-core's own "*** ..." steps pass as they are.
  # pip -v indents its build's output; awk's fields ignore that.
  awk '
    $1 ~ /^\[[0-9]+\/[0-9]+\]$/ {
      target = ""
      for (i = 2; i < NF; i++) if ($i == "-o") { target = $(i + 1); break }
      n = split(target, parts, "/")
      printf "  %s %s\n", $1, (n ? parts[n] : "")
      fflush()
      next
    }
    $1 == "***" { line = $0; sub(/^[ \t]+/, "", line); print "  " line; fflush() }
  '
}

if [ "${1:-}" = "--progress" ]; then
  progress
  exit 0
fi

venv=${1:?usage: scripts/install-llama-cpp.sh VENV}
py="$venv/bin/python"
spec=$(grep -o '"llama-cpp-python==[^"]*"' pyproject.toml | tr -d '"')
want=${spec#*==}
have=$("$py" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))' \
  2>/dev/null || true)

extra=()
if [ -n "${CMAKE_ARGS:-}" ]; then
  echo "==> llama-cpp-python $want: compiling llama.cpp with CMAKE_ARGS=\"$CMAKE_ARGS\"" \
       "(a fresh build, not pip's wheel cache: 5-15 minutes, longer for CUDA)"
  extra=(--force-reinstall --no-cache-dir --no-deps)
elif [ "$have" = "$want" ]; then
  echo "==> llama-cpp-python $want already installed"
  exit 0
elif "$py" -m pip cache list llama_cpp_python 2>/dev/null | grep -q "llama_cpp_python-$want-"; then
  echo "==> llama-cpp-python $want: installing the wheel pip built before (seconds)"
else
  echo "==> llama-cpp-python $want: compiling llama.cpp once (3-6 minutes on 2 cores);"
  echo "    later installs reuse the wheel from pip's cache. Build steps:"
fi

log="$venv/llama-cpp-python-build.log"
if ! "$py" -m pip install -v ${extra[@]+"${extra[@]}"} "$spec" 2>&1 | tee "$log" | progress; then
  echo "==> llama-cpp-python failed to install; the last lines of $log:" >&2
  tail -n 30 "$log" >&2
  exit 1
fi
echo "==> llama-cpp-python $want installed (full log: $log)"
