"""Generate random-weight model pairs (text GGUF + mmproj GGUF) of the served families.

- "llava": llama architecture, SPM vocab, CLIP ViT with the fixed-size "mlp" projector.
- "youtu-vl": deepseek2 architecture (multi-head latent attention), byte-level BPE vocab with
  the "youtu" pre-tokenizer, and the dynamic-resolution "youtuvl" projector.
- "glm4v": glm4 architecture (M-RoPE), byte-level BPE vocab with the "glm4" pre-tokenizer and
  GLM's special tokens, and the "glm4v" projector (Qwen2-VL-style dynamic resolution).
- "qwen2vl": qwen2vl architecture (M-RoPE), ChatML, and the "qwen2vl_merger" projector: not
  a served family, the proof that the generic image sizing fits a type nothing else names.

The files are real llama.cpp models, so the whole serving path runs end to end without
downloading anything; the output is random text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from server.engine.templates import CHATML

from .bpe_vocab import build_bpe_vocab
from .chat_template import GLM_4V_CHAT_TEMPLATE, LLAVA_CHAT_TEMPLATE, YOUTU_VL_CHAT_TEMPLATE
from .clip_projector import write_clip_projector
from .config import CONFIGS, DemoSize, ModelConfig
from .glm_config import GLM_CONFIGS, GlmModelConfig
from .glm_projector import write_glm_projector
from .glm_text_model import SPECIAL_TOKENS as GLM_SPECIAL_TOKENS
from .glm_text_model import write_glm_text_model
from .qwen_model import QWEN_CONFIGS, QwenModelConfig, write_qwen_projector, write_qwen_text_model
from .qwen_model import SPECIAL_TOKENS as QWEN_SPECIAL_TOKENS
from .text_model import write_text_model
from .vocab import build_vocab
from .youtu_config import YOUTU_CONFIGS, YoutuModelConfig
from .youtu_projector import write_youtu_projector
from .youtu_text_model import write_youtu_text_model

__all__ = [
    "FAMILIES",
    "LLAVA_CHAT_TEMPLATE",
    "YOUTU_VL_CHAT_TEMPLATE",
    "DemoFamily",
    "DemoModelPaths",
    "DemoSize",
    "demo_model_paths",
    "make_demo_model",
]

DemoFamily = Literal["llava", "youtu-vl", "glm4v", "qwen2vl"]
FAMILIES: tuple[str, ...] = get_args(DemoFamily)


@dataclass(frozen=True)
class DemoModelPaths:
    text: Path  # the text-model GGUF
    mmproj: Path  # the vision projector GGUF


def demo_model_paths(
    out_dir: Path, size: DemoSize = "tiny", family: DemoFamily = "llava"
) -> DemoModelPaths:
    """Where make_demo_model writes (or wrote) the given model, without generating anything."""
    prefix = _config(size, family).file_prefix
    out_dir = Path(out_dir)
    return DemoModelPaths(
        text=out_dir / f"{prefix}-{family}-text.gguf",
        mmproj=out_dir / f"{prefix}-{family}-mmproj.gguf",
    )


def make_demo_model(
    out_dir: Path, *, seed: int = 0, size: DemoSize = "tiny", family: DemoFamily = "llava"
) -> DemoModelPaths:
    """Write the text model and the projector into `out_dir`, replacing existing files.

    Same seed, size and family give byte-identical files. Each file is written under a
    temporary name and renamed, so a crash never leaves a truncated model behind.
    """
    cfg = _config(size, family)
    paths = demo_model_paths(out_dir, size, family)
    # Independent streams: the text weights do not depend on how many numbers the
    # projector draws, and vice versa.
    text_seed, vision_seed = np.random.SeedSequence(seed).spawn(2)
    text_rng, vision_rng = np.random.default_rng(text_seed), np.random.default_rng(vision_seed)
    if isinstance(cfg, QwenModelConfig):
        write_qwen_text_model(paths.text, cfg, build_bpe_vocab(QWEN_SPECIAL_TOKENS), text_rng,
                              CHATML)
        write_qwen_projector(paths.mmproj, cfg.vision, cfg.text.n_embd, vision_rng,
                             name=f"{cfg.name}-mmproj")
    elif isinstance(cfg, GlmModelConfig):
        write_glm_text_model(paths.text, cfg, build_bpe_vocab(GLM_SPECIAL_TOKENS), text_rng,
                             GLM_4V_CHAT_TEMPLATE)
        write_glm_projector(paths.mmproj, cfg.vision, cfg.text.n_embd, vision_rng,
                            name=f"{cfg.name}-mmproj")
    elif isinstance(cfg, YoutuModelConfig):
        write_youtu_text_model(paths.text, cfg.text, build_bpe_vocab(), text_rng, name=cfg.name)
        write_youtu_projector(paths.mmproj, cfg.vision, cfg.text.n_embd, vision_rng,
                              name=f"{cfg.name}-mmproj")
    else:
        write_text_model(paths.text, cfg.text, build_vocab(), text_rng, name=cfg.name)
        write_clip_projector(paths.mmproj, cfg.vision, cfg.text.n_embd, vision_rng,
                             name=f"{cfg.name}-mmproj")
    return paths


def _config(size: str, family: str
            ) -> ModelConfig | YoutuModelConfig | GlmModelConfig | QwenModelConfig:
    by_family: dict[str, dict] = {"llava": CONFIGS, "youtu-vl": YOUTU_CONFIGS,
                                  "glm4v": GLM_CONFIGS, "qwen2vl": QWEN_CONFIGS}
    if family not in by_family:
        raise ValueError(f"unknown demo model family {family!r}; expected one of {FAMILIES}")
    try:
        return by_family[family][size]
    except KeyError:
        raise ValueError(
            f"unknown demo model size {size!r}; expected one of {sorted(by_family[family])}"
        ) from None
