"""Shapes of the demo models: a tiny one for tests and a bench one sized like real small models."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DemoSize = Literal["tiny", "bench"]


@dataclass(frozen=True)
class TextConfig:
    """Hyper-parameters of the llama-architecture text model."""

    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_ctx_train: int
    f16: bool  # store the big matrices as F16 (norms always stay F32)
    rms_eps: float = 1e-5
    rope_freq_base: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


@dataclass(frozen=True)
class VisionConfig:
    """Hyper-parameters of the CLIP ViT encoder and its LLaVA MLP projector."""

    image_size: int
    patch_size: int
    n_embd: int
    n_layer: int
    n_head: int
    n_ff: int
    f16: bool
    eps: float = 1e-5

    @property
    def n_patches(self) -> int:
        side = self.image_size // self.patch_size
        return side * side


@dataclass(frozen=True)
class ModelConfig:
    file_prefix: str  # "demo" or "bench": file names are {prefix}-{family}-{text,mmproj}.gguf
    name: str
    text: TextConfig
    vision: VisionConfig


CONFIGS: dict[str, ModelConfig] = {
    # A few MB: loads and runs in well under a second on CPU. 2 KV heads exercise the GQA path.
    "tiny": ModelConfig(
        file_prefix="demo",
        name="vlserve-demo-llava-tiny",
        text=TextConfig(
            n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=128, n_ctx_train=4096, f16=False
        ),
        # 112 px / 14 px patches = 8x8 = 64 image tokens.
        vision=VisionConfig(
            image_size=112, patch_size=14, n_embd=64, n_layer=2, n_head=4, n_ff=128, f16=False
        ),
    ),
    # Roughly GPT-2-small text + ViT-B/16 vision: big enough that timings mean something.
    "bench": ModelConfig(
        file_prefix="bench",
        name="vlserve-demo-llava-bench",
        text=TextConfig(
            n_embd=768, n_layer=12, n_head=12, n_head_kv=12, n_ff=2048, n_ctx_train=4096, f16=True
        ),
        # 224 px / 16 px patches = 14x14 = 196 image tokens.
        vision=VisionConfig(
            image_size=224, patch_size=16, n_embd=768, n_layer=12, n_head=12, n_ff=3072, f16=True
        ),
    ),
}
