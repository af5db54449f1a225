"""Text architectures and vision projector types this build of llama.cpp can load.

Copied from the llama.cpp vendored in llama-cpp-python 0.3.36: LLM_ARCH_NAMES in
src/llama-arch.cpp and PROJECTOR_TYPE_NAMES in tools/mtmd/clip-impl.h. llama.cpp exports no
list of them, and an mmproj with an unknown type otherwise fails deep inside mtmd with
"unknown projector type". Refresh both lists when the pinned version changes.

`vlserve serve` (before anything loads) and `vlserve doctor` both judge a model's files here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.gguf_meta import read_gguf_metadata

VERSION = "0.3.36"

ARCHITECTURES = frozenset("""
    clip llama llama4 deci falcon grok gpt2 gptj gptneox mpt baichuan starcoder refact
    bert modern-bert nomic-bert nomic-bert-moe neo-bert jina-bert-v2 jina-bert-v3
    eurobert bloom stablelm qwen qwen2 qwen2moe qwen2vl qwen3 qwen3moe qwen3next qwen3vl
    qwen3vlmoe qwen35 qwen35moe qwen4exp phi2 phi3 phimoe plamo plamo2 plamo3 codeshell
    orion internlm2 minicpm minicpm3 gemma gemma2 gemma3 gemma3n gemma4 gemma4-assistant
    gemma-embedding starcoder2 mamba mamba2 maple jamba falcon-h1 xverse command-r
    cohere2 cohere2moe dbrx olmo olmo2 olmoe muse-glimmer openelm arctic deepseek
    deepseek2 deepseek2-ocr deepseek32 deepseek4 chatglm glm4 glm4moe glm-dsa bitnet t5
    t5encoder jais jais2 nemotron nemotron_h nemotron_h_moe exaone exaone4 exaone-moe
    rwkv6 rwkv6qwen2 rwkv7 arwkv7 granite granitemoe granitehybrid graniteswitch
    granite_swa chameleon wavtokenizer-dec plm bailingmoe bailingmoe2 bailingmoe3 dots1
    dots3note arcee afmoe laguna ernie4_5 ernie4_5-moe hunyuan-moe hunyuan-dense
    hunyuan_vl hy_v3 hy_v4 smollm3 gpt-oss lfm2 lfm2moe dream smallthinker llada
    llada-moe seed_oss grovemoe apertus minimax-01 hrm_text minimax-m2 minimax-m3 cogvlm
    rnd1 pangu-embedded mistral3 eagle3 dflash mistral4 paddleocr mimo2 step35 spark2_5
    llama-embed maincoder kimi-linear kimi-k3 glm5-next talkie mellum nanbeige qwen3tts
    pockettts
""".split())

PROJECTOR_TYPES = frozenset("""
    mlp ldp ldpv2 resampler adapter qwen2vl_merger qwen2.5vl_merger qwen3vl_merger
    ling3vl step3vl gemma3 gemma3nv gemma3na gemma4v gemma4a gemma4uv gemma4ua phi4
    idefics3 pixtral ultravox internvl llama4 qwen2a qwen3a glma qwen2.5o voxtral
    meralion musicflamingo lfm2 kimivl paddleocr lightonocr cogvlm janus_pro dots_ocr
    dots3note_v dots3note_a deepseekocr deepseekocr2 deepseek4v lfm2a glm4v glm5v
    youtuvl yasa2 kimik25 nemotron_v2_vl exaone4_5 hunyuanvl minicpmv4_6 granite_speech
    mimovl minimax_m3 granite4_vision mimo_audio parakeet qwen3tts_spkenc qwen3tts_gen
    pockettts_spkenc pockettts_gen muse-glimmer
""".split())


def architecture_supported(name: str) -> bool:
    return name in ARCHITECTURES


def projector_supported(name: str) -> bool:
    return name in PROJECTOR_TYPES


@dataclass(frozen=True)
class GgufKinds:
    """The header facts llama.cpp dispatches on: which loader, which projector graph."""

    architecture: str
    projector_type: str
    has_vision: bool
    chat_template: str | None


def read_gguf_kinds(model: Path, mmproj: Path | None) -> GgufKinds:
    """Read from the key/value headers only (milliseconds, even for a 262k vocabulary).

    The projector type is looked up in clip.cpp's own order: clip.projector_type, then
    clip.vision.projector_type (files with several modalities). Raises GGUFMetaError when a
    file is not GGUF, OSError when it cannot be read.
    """
    text = read_gguf_metadata(model)
    vision = read_gguf_metadata(mmproj) if mmproj is not None else {}

    def string(fields: dict[str, Any], key: str) -> str | None:
        value = fields.get(key)
        return value if isinstance(value, str) and value else None

    return GgufKinds(
        architecture=string(text, "general.architecture") or "",
        projector_type=(string(vision, "clip.projector_type")
                        or string(vision, "clip.vision.projector_type") or ""),
        has_vision=bool(vision.get("clip.has_vision_encoder", False)),
        chat_template=string(text, "tokenizer.chat_template"),
    )


# Model kinds people ask for that this llama.cpp cannot load, and what to serve instead.
# Llama-3.2-Vision's cross-attention "mllama" was never merged into llama.cpp (only Ollama's
# fork runs it); Llama 4 (projector "llama4") is Meta's vision model that llama.cpp does run.
_INSTEAD = {
    "mllama": "Llama-3.2-Vision (mllama) is not in llama.cpp; serve Llama 4 Scout (projector "
              "llama4) or a registry family instead (glm-4.6v-flash, youtu-vl-4b-instruct, "
              "llava-1.5-7b: `vlserve models`)",
}
_DEFAULT_INSTEAD = ("serve a supported family instead (`vlserve models` lists the registry's, "
                    "with their status)")


def gguf_problems(kinds: GgufKinds, mmproj: Path | None) -> list[str]:
    """Why llama.cpp in this build would refuse these files; empty when it can load them."""
    problems = []
    if not architecture_supported(kinds.architecture):
        problems.append(f"text model architecture {kinds.architecture or '(none)'!r} is not "
                        f"one llama.cpp in llama-cpp-python {VERSION} can load")
    if mmproj is None:  # a text-only model: no projector to check
        return problems
    if not kinds.has_vision:
        problems.append(f"{mmproj} has no vision encoder (clip.has_vision_encoder)")
    if not projector_supported(kinds.projector_type):
        problems.append(f"projector type {kinds.projector_type or '(none)'!r} in "
                        f"{Path(mmproj).name} is not supported by llama.cpp in "
                        f"llama-cpp-python {VERSION} (known types: server/engine/supported.py)")
    return problems


def instead(kinds: GgufKinds) -> str:
    """What to do about an unsupported model: a known alternative, else the registry."""
    for kind in (kinds.architecture, kinds.projector_type):
        if kind in _INSTEAD:
            return _INSTEAD[kind]
    return _DEFAULT_INSTEAD


def support_summary(kinds: GgufKinds, text_only: bool) -> str:
    """One line for `vlserve models`: the kinds and whether this build loads them."""
    what = kinds.architecture or "?"
    if not text_only:
        what += f" + {kinds.projector_type or '?'}"
    problems = gguf_problems(kinds, None if text_only else Path("mmproj"))
    if not problems:
        return f"{what}: supported by llama.cpp in llama-cpp-python {VERSION}"
    if not kinds.architecture or not (text_only or kinds.projector_type):
        return f"{what}: unknown (not in the registry; download it and run `vlserve doctor`)"
    return f"{what}: NOT supported: {'; '.join(problems)}; {instead(kinds)}"
