"""Write a GGUF file so that readers only ever see a complete file or none."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from gguf import GGUFValueType, GGUFWriter


def write_gguf_atomically(path: Path, arch: str, fill: Callable[[GGUFWriter], None]) -> None:
    """Let `fill` add keys and tensors, write to a temp file beside `path`, then rename it.

    The temp file lives in the same directory so `os.replace` is an atomic rename; a crash
    leaves at most a stray `.part` file, never a truncated `path`.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        # gguf-py logs an INFO line per file; keep library users' logs quiet.
        gguf_logger = logging.getLogger("gguf.gguf_writer")
        previous_level = gguf_logger.level
        gguf_logger.setLevel(logging.WARNING)
        try:
            writer = GGUFWriter(tmp, arch)
            try:
                fill(writer)
                writer.write_header_to_file()
                writer.write_kv_data_to_file()
                writer.write_tensors_to_file()
            finally:
                writer.close()
        finally:
            gguf_logger.setLevel(previous_level)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # data must be on disk before the rename makes it visible
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; model files are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def add_f32_array(writer: GGUFWriter, key: str, values: Sequence[float]) -> None:
    # Explicit sub-type: llama.cpp rejects arrays whose element type is not exactly FLOAT32.
    writer.add_key_value(key, list(values), GGUFValueType.ARRAY, sub_type=GGUFValueType.FLOAT32)
