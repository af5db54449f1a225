"""Shapes of the Youtu-VL-style demo models: deepseek2 (MLA) text + youtuvl vision."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MlaTextConfig:
    """Hyper-parameters of the deepseek2-architecture text model (dense, multi-head latent
    attention), named as in the HF config the converter reads."""

    n_embd: int
    n_layer: int
    n_head: int
    n_ff: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_ctx_train: int
    f16: bool
    rms_eps: float = 1e-6
    rope_freq_base: float = 1_600_000.0  # Youtu-LLM's rope_theta

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True)
class YoutuVisionConfig:
    """A SigLIP-style ViT with 2-D RoPE, window attention and a 2x2 patch-merger MLP."""

    image_size: int  # only read by clip.cpp for warm-up sizing; images are dynamic
    patch_size: int
    n_embd: int
    n_layer: int
    n_head: int
    n_ff: int
    window_size: int  # pixels per attention window side
    full_attention_layers: tuple[int, ...]  # every other layer attends within its window
    f16: bool
    eps: float = 1e-6
    spatial_merge: int = 2  # clip.cpp's youtuvl graph hard-codes 2

    @property
    def merger_n_ff(self) -> int:
        return self.n_embd * self.spatial_merge**2


@dataclass(frozen=True)
class YoutuModelConfig:
    file_prefix: str
    name: str
    text: MlaTextConfig
    vision: YoutuVisionConfig


YOUTU_CONFIGS: dict[str, YoutuModelConfig] = {
    # A few MB. Youtu-VL's vision geometry (16 px patches, 2x2 merge: one token per 32 px
    # square) at toy widths; 64 px windows, so images over 64 px really use several.
    "tiny": YoutuModelConfig(
        file_prefix="demo",
        name="vlserve-demo-youtu-vl-tiny",
        text=MlaTextConfig(
            n_embd=64, n_layer=2, n_head=4, n_ff=128, q_lora_rank=32, kv_lora_rank=32,
            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_ctx_train=4096, f16=False,
        ),
        vision=YoutuVisionConfig(
            image_size=560, patch_size=16, n_embd=64, n_layer=2, n_head=4, n_ff=128,
            window_size=64, full_attention_layers=(1,), f16=False,
        ),
    ),
    # Big enough that timings mean something, like the LLaVA bench model.
    "bench": YoutuModelConfig(
        file_prefix="bench",
        name="vlserve-demo-youtu-vl-bench",
        text=MlaTextConfig(
            n_embd=768, n_layer=12, n_head=12, n_ff=2048, q_lora_rank=384, kv_lora_rank=256,
            qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_ctx_train=4096, f16=True,
        ),
        vision=YoutuVisionConfig(
            image_size=560, patch_size=16, n_embd=768, n_layer=12, n_head=12, n_ff=3072,
            window_size=256, full_attention_layers=(3, 7, 11), f16=True,
        ),
    ),
}
