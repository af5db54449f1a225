"""Shapes of the GLM-4V-style demo models: glm4 text (M-RoPE) + glm4v vision."""

from __future__ import annotations

from dataclasses import dataclass

from .config import TextConfig


@dataclass(frozen=True)
class GlmVisionConfig:
    """GLM-4.1V's ViT: two-frame patch conv, RMS norms, 2-D RoPE plus learned positions,
    a SwiGLU MLP, then a 2x2 conv merger and an MLP projector (clip.cpp clip_graph_glm4v)."""

    image_size: int  # sets the learned position grid (image_size / patch_size per side)
    patch_size: int
    n_embd: int
    n_layer: int
    n_head: int
    n_ff: int
    merger_n_ff: int  # the projector MLP's hidden width (GLM-4.1V: the text model's n_ff)
    f16: bool
    eps: float = 1e-5
    spatial_merge: int = 2

    @property
    def n_positions(self) -> int:
        side = self.image_size // self.patch_size
        return side * side


@dataclass(frozen=True)
class GlmModelConfig:
    file_prefix: str
    name: str
    text: TextConfig
    vision: GlmVisionConfig

    @property
    def rope_dims(self) -> int:
        """GLM-4 rotates half of each head (partial_rotary_factor 0.5)."""
        return self.text.head_dim // 2

    @property
    def rope_sections(self) -> tuple[int, int, int, int]:
        """M-RoPE sections (temporal, height, width, unused) over rope_dims / 2 pairs, split
        as GLM-4.1V's [8, 12, 12] splits 32: image tokens get 2-D positions only with these
        (glm4 without them aborts on image embeddings: "does not support multimodal")."""
        pairs = self.rope_dims // 2
        t = pairs // 4
        h = (pairs - t) // 2
        return t, h, pairs - t - h, 0


GLM_CONFIGS: dict[str, GlmModelConfig] = {
    # A few MB: GLM-4.1V's vision geometry (14 px patches merged 2x2: one token per 28 px
    # square, learned positions for a 24 x 24 grid resized to each image) at toy widths.
    "tiny": GlmModelConfig(
        file_prefix="demo",
        name="vlserve-demo-glm4v-tiny",
        text=TextConfig(n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=128,
                        n_ctx_train=4096, f16=False),
        vision=GlmVisionConfig(image_size=336, patch_size=14, n_embd=64, n_layer=2, n_head=4,
                               n_ff=128, merger_n_ff=128, f16=False),
    ),
    # Big enough that timings mean something, like the other bench models.
    "bench": GlmModelConfig(
        file_prefix="bench",
        name="vlserve-demo-glm4v-bench",
        text=TextConfig(n_embd=768, n_layer=12, n_head=12, n_head_kv=4, n_ff=2048,
                        n_ctx_train=4096, f16=True),
        vision=GlmVisionConfig(image_size=336, patch_size=14, n_embd=768, n_layer=12,
                               n_head=12, n_ff=3072, merger_n_ff=2048, f16=True),
    ),
}
