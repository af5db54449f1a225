"""Write a GGUF file so that readers only ever see a complete file or none."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from gguf import GGUFValueType, GGUFWriter, LlamaFileType


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


class VisionHeader(Protocol):
    """What every family's vision config gives the projector file's common keys."""

    f16: bool
    image_size: int
    patch_size: int
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    eps: float


def add_vision_header(writer: GGUFWriter, cfg: VisionHeader, *, name: str, description: str,
                      projector_type: str, text_n_embd: int, image_mean: Sequence[float],
                      image_std: Sequence[float]) -> None:
    """The keys clip.cpp reads from every mmproj; each family adds its own after them."""
    writer.add_string("general.name", name)
    writer.add_string("general.description", description)
    ftype = LlamaFileType.MOSTLY_F16 if cfg.f16 else LlamaFileType.ALL_F32
    writer.add_uint32("general.file_type", int(ftype))
    # clip.cpp builds a vision encoder only when this flag is present and true.
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_string("clip.projector_type", projector_type)
    writer.add_uint32("clip.vision.image_size", cfg.image_size)
    writer.add_uint32("clip.vision.patch_size", cfg.patch_size)
    writer.add_uint32("clip.vision.embedding_length", cfg.n_embd)
    writer.add_uint32("clip.vision.feed_forward_length", cfg.n_ff)
    # Required by the loader even where a projector takes its output size from its tensors.
    writer.add_uint32("clip.vision.projection_dim", text_n_embd)
    writer.add_uint32("clip.vision.block_count", cfg.n_layer)
    writer.add_uint32("clip.vision.attention.head_count", cfg.n_head)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", cfg.eps)
    # Optional in the loader's code path, but it throws when fewer than 3 values are found.
    add_f32_array(writer, "clip.vision.image_mean", image_mean)
    add_f32_array(writer, "clip.vision.image_std", image_std)
