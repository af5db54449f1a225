"""Generate a random-weight LLaVA-style model pair (text GGUF + CLIP mmproj GGUF).

The files are real llama.cpp models (llama architecture, SPM vocab, "mlp" projector) so the whole
serving path runs end to end without downloading anything; the output is random text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .chat_template import LLAVA_CHAT_TEMPLATE
from .clip_projector import write_clip_projector
from .config import CONFIGS, DemoSize, ModelConfig
from .text_model import write_text_model
from .vocab import build_vocab

__all__ = [
    "LLAVA_CHAT_TEMPLATE",
    "DemoModelPaths",
    "DemoSize",
    "demo_model_paths",
    "make_demo_model",
]


@dataclass(frozen=True)
class DemoModelPaths:
    text: Path  # the llama-architecture text GGUF
    mmproj: Path  # the CLIP projector GGUF


def demo_model_paths(out_dir: Path, size: DemoSize = "tiny") -> DemoModelPaths:
    """Where make_demo_model writes (or wrote) the given size, without generating anything."""
    prefix = _config(size).file_prefix
    out_dir = Path(out_dir)
    return DemoModelPaths(
        text=out_dir / f"{prefix}-llava-text.gguf",
        mmproj=out_dir / f"{prefix}-llava-mmproj.gguf",
    )


def make_demo_model(out_dir: Path, *, seed: int = 0, size: DemoSize = "tiny") -> DemoModelPaths:
    """Write the text model and the projector into `out_dir`, replacing existing files.

    Same seed and size give byte-identical files. Each file is written under a temporary name
    and renamed, so a crash never leaves a truncated model behind.
    """
    cfg = _config(size)
    paths = demo_model_paths(out_dir, size)
    # Independent streams: the text weights do not depend on how many numbers the
    # projector draws, and vice versa.
    text_seed, vision_seed = np.random.SeedSequence(seed).spawn(2)
    write_text_model(
        paths.text, cfg.text, build_vocab(), np.random.default_rng(text_seed), name=cfg.name
    )
    write_clip_projector(
        paths.mmproj,
        cfg.vision,
        cfg.text.n_embd,
        np.random.default_rng(vision_seed),
        name=f"{cfg.name}-mmproj",
    )
    return paths


def _config(size: str) -> ModelConfig:
    try:
        return CONFIGS[size]
    except KeyError:
        raise ValueError(
            f"unknown demo model size {size!r}; expected one of {sorted(CONFIGS)}"
        ) from None
