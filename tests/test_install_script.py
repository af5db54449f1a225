"""scripts/install-llama-cpp.sh (run by `make install` / `run` / `test`): it says before the
long llama.cpp compile what is happening and shows the build's progress, and the Makefile
installs everything else quietly after it.

The compile itself takes minutes, so the build runs against a stand-in `python` whose
`pip install -v` prints the lines a real one does (ninja's `[n/N] command` lines and
scikit-build-core's `***` steps); the already-installed path runs against this real venv.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

SCRIPT = ROOT / "scripts" / "install-llama-cpp.sh"

# What `pip install -v llama-cpp-python` prints while compiling (abridged).
BUILD_OUTPUT = """\
Building wheels for collected packages: llama-cpp-python
  Running command Building wheel for llama-cpp-python (pyproject.toml)
  *** scikit-build-core 0.11.5 using CMake 3.25.1 (wheel)
  *** Configuring CMake...
  -- The C compiler identification is GNU 12.2.0
  *** Building project with Ninja...
  [1/3] /usr/bin/cc -DGGML_SHARED -O3 -MD -MT vendor/llama.cpp/ggml/src/CMakeFiles/ggml-base.dir/ggml.c.o -o vendor/llama.cpp/ggml/src/CMakeFiles/ggml-base.dir/ggml.c.o -c /tmp/b/vendor/llama.cpp/ggml/src/ggml.c
  [2/3] /usr/bin/g++ -DLLAMA_SHARED -O3 -o vendor/llama.cpp/src/CMakeFiles/llama.dir/llama.cpp.o -c /tmp/b/vendor/llama.cpp/src/llama.cpp
  [3/3] : && /usr/bin/g++ -fPIC -O3 -shared -Wl,-soname,libllama.so -o bin/libllama.so vendor/llama.cpp/src/CMakeFiles/llama.dir/llama.cpp.o && :
  *** Installing project into wheel...
Successfully installed llama-cpp-python-0.3.36
"""  # noqa: E501


def fake_venv(tmp: Path, *, pip_status: int = 0, cached: bool = False) -> Path:
    """A venv whose python has no llama-cpp-python yet and a pip that prints BUILD_OUTPUT."""
    (tmp / "bin").mkdir(parents=True)
    (tmp / "build.txt").write_text(BUILD_OUTPUT)
    cache = "llama_cpp_python-0.3.36-cp311-cp311-linux_x86_64.whl" if cached else ""
    python = tmp / "bin" / "python"
    python.write_text(f"""#!/bin/sh
echo "$@" >> "{tmp}/calls"
case "$*" in
  "-c "*) exit 1 ;;
  "-m pip cache list"*) echo "{cache}" ;;
  "-m pip install"*) cat "{tmp}/build.txt"; exit {pip_status} ;;
esac
""")
    python.chmod(0o755)
    return tmp


def run(venv: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "CMAKE_ARGS"} | env
    return subprocess.run(["bash", str(SCRIPT), str(venv)], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=60)


def test_first_install_says_it_compiles_and_shows_progress(tmp_path: Path) -> None:
    result = run(fake_venv(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "==> llama-cpp-python 0.3.36: compiling llama.cpp once (3-6 minutes on 2 cores);",
        "    later installs reuse the wheel from pip's cache. Build steps:",
        "  *** scikit-build-core 0.11.5 using CMake 3.25.1 (wheel)",
        "  *** Configuring CMake...",
        "  *** Building project with Ninja...",
        "  [1/3] ggml.c.o",
        "  [2/3] llama.cpp.o",
        "  [3/3] libllama.so",
        "  *** Installing project into wheel...",
        f"==> llama-cpp-python 0.3.36 installed (full log: {tmp_path}/"
        "llama-cpp-python-build.log)",
    ]
    assert (tmp_path / "llama-cpp-python-build.log").read_text() == BUILD_OUTPUT
    assert "-m pip install -v llama-cpp-python==0.3.36" in (tmp_path / "calls").read_text()


def test_a_cached_wheel_is_announced_as_such(tmp_path: Path) -> None:
    result = run(fake_venv(tmp_path, cached=True))
    assert result.stdout.splitlines()[0] == \
        "==> llama-cpp-python 0.3.36: installing the wheel pip built before (seconds)"


def test_cmake_args_force_a_fresh_build(tmp_path: Path) -> None:
    result = run(fake_venv(tmp_path, cached=True), CMAKE_ARGS="-DGGML_CUDA=on")
    assert result.stdout.splitlines()[0].startswith(
        '==> llama-cpp-python 0.3.36: compiling llama.cpp with CMAKE_ARGS="-DGGML_CUDA=on" '
        "(a fresh build, not pip's wheel cache")
    assert "--force-reinstall --no-cache-dir" in (tmp_path / "calls").read_text()


def test_a_failed_build_shows_the_end_of_its_log(tmp_path: Path) -> None:
    result = run(fake_venv(tmp_path, pip_status=1))
    assert result.returncode == 1
    assert "==> llama-cpp-python failed to install; the last lines of" in result.stderr
    assert "Successfully installed llama-cpp-python-0.3.36" in result.stderr


def test_already_installed_is_one_line() -> None:
    venv = Path(sys.executable).parent.parent  # this test run's venv has the pinned version
    result = run(venv)
    assert (result.returncode, result.stdout) == (
        0, "==> llama-cpp-python 0.3.36 already installed\n")


def test_make_installs_llama_cpp_first_with_progress_then_the_rest_quietly() -> None:
    result = subprocess.run(["make", "-n", "-B", "install"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    lines = result.stdout.splitlines()
    script = next(i for i, line in enumerate(lines) if "install-llama-cpp.sh" in line)
    rest = next(i for i, line in enumerate(lines) if "pip install --quiet -e '.[dev]'" in line)
    assert script < rest
    assert "--quiet" not in lines[script]
