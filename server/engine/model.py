"""Load the text model, its llama context and the mtmd (vision projector) context."""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import llama_cpp
from llama_cpp import mtmd_cpp

from server.config import Settings
from server.cpus import default_threads, oversubscribed, usable_cores
from server.engine import llama_log
from server.engine.build_info import read_build_info
from server.engine.next_turn import turn_markup
from server.engine.placement import Placement, placement_warnings, read_placement
from server.engine.projector import ImageGeometry, ProjectorInfo, read_projector_info
from server.engine.prompt import ChatTemplate
from server.engine.templates import ResolvedTemplate, TemplateConfigError, template_for
from server.engine.textparts import MarkupSplitter
from server.engine.tokens import single_control_token, token_piece, tokenize_text
from server.engine.utf8_guard import Utf8Vocab

logger = logging.getLogger("vlserve.engine")

_FLASH_ATTN = {
    "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}


class ModelLoadError(RuntimeError):
    pass


@dataclass
class LoadedModel:
    """Native handles plus what the scheduler needs per token, precomputed once."""

    model: llama_cpp.llama_model_p
    ctx: llama_cpp.llama_context_p
    vocab: llama_cpp.llama_vocab_p
    mtmd: mtmd_cpp.mtmd_context_p | None  # None: a text-only model (no mmproj)
    n_ctx: int
    n_batch: int
    n_vocab: int
    pieces: list[bytes]  # token id → UTF-8 bytes of its text
    # The vocab's end-of-generation tokens, plus the template's turn markers that are single
    # special tokens (they render as no text, so the stop strings below cannot see them).
    eog_tokens: frozenset[int]
    # SentencePiece vocabs mark word starts with a space, so an answer's first piece begins
    # with one; like HF's decode, it is dropped. The answer sent back in the next turn then
    # tokenizes to the very tokens that were generated, and their KV is reused.
    strip_first_space: bool
    # The tokenizer puts a space before text (SentencePiece's add_space_prefix: Llama's
    # vocab, not Gemma's): a raw prompt's echo leaves it out (server/engine/prompt_text.py).
    space_prefix: bool
    template: ChatTemplate
    media_marker: str
    # Text that opens the next turn (the template's, plus the preset's `stop`): generation
    # ends there with finish_reason "stop", and the marker never reaches the client.
    stop_strings: tuple[str, ...] = ()
    # Texts of the control tokens: where the template's markup may yield special tokens.
    special_texts: tuple[str, ...] = ()
    # No token stands for more bytes of text than this (None: a normalizing vocab, no bound).
    max_token_bytes: int | None = None
    # What every next turn starts with after an answer (server/engine/next_turn.py).
    next_turn_markup: tuple[int, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)
    load_log: list[str] = field(default_factory=list)  # llama.cpp's lines while loading

    @cached_property
    def splitter(self) -> MarkupSplitter:
        """Where the template's markup may yield special tokens (one per model: it caches
        each distinct markup string's split)."""
        return MarkupSplitter(self.special_texts, self.media_marker)

    @cached_property
    def utf8(self) -> Utf8Vocab:
        """UTF-8 facts about the pieces, for constrained answers (built on first use)."""
        return Utf8Vocab(self.pieces, self.eog_tokens)

    @property
    def vision(self) -> bool:
        return self.mtmd is not None

    def close(self) -> None:
        if self.mtmd is not None:
            mtmd_cpp.mtmd_free(self.mtmd)
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)


def load_model(settings: Settings) -> LoadedModel:
    for path, what in ((settings.model, "model"), (settings.mmproj, "mmproj")):
        if path is not None and not Path(path).is_file():
            raise ModelLoadError(f"{what} file not found: {path}")
    with llama_log.record() as load_log:
        loaded = _load(settings)
    loaded.load_log = load_log
    update_placement(loaded, settings, load_log)
    return loaded


def update_placement(loaded: LoadedModel, settings: Settings, log: list[str]) -> Placement:
    """Read placement back from llama.cpp's log into `info` (again after the first encode,
    which is when clip.cpp reports the encoder's flash attention and unsupported ops)."""
    placement = read_placement(log)
    loaded.info.update(
        placement=placement.as_dict(),
        gpu_layers=placement.gpu_layers,
        projector_on_gpu=placement.projector_on_gpu,
        placement_warnings=placement_warnings(
            placement, gpu_build=loaded.info["gpu_build"], n_gpu_layers=settings.n_gpu_layers,
            mmproj_use_gpu=settings.mmproj_use_gpu, flash_attn=settings.flash_attn,
            n_layers=loaded.info["n_layers"]),
    )
    return placement


def _load(settings: Settings) -> LoadedModel:
    llama_cpp.llama_backend_init()
    cores = usable_cores()
    n_threads = settings.n_threads or default_threads(cores.usable)
    problem = oversubscribed(settings.n_threads, cores)
    if problem is not None:
        logger.warning("%s", problem)

    model_params = llama_cpp.llama_model_default_params()
    model_params.n_gpu_layers = settings.n_gpu_layers
    model = llama_cpp.llama_model_load_from_file(str(settings.model).encode(), model_params)
    if not model:
        raise ModelLoadError(f"llama.cpp could not load the model {settings.model}")

    ctx_params = llama_cpp.llama_context_default_params()
    ctx_params.n_ctx = settings.n_ctx
    ctx_params.n_batch = settings.n_batch
    ctx_params.n_ubatch = settings.n_ubatch
    ctx_params.n_seq_max = settings.n_parallel
    ctx_params.n_threads = n_threads
    ctx_params.n_threads_batch = n_threads
    ctx_params.flash_attn_type = _FLASH_ATTN[settings.flash_attn]
    # One KV pool shared by all slots, so any one conversation may use the whole n_ctx.
    ctx_params.kv_unified = True
    # Full-size sliding-window caches (the library's default, set so it stays): prefix
    # reuse cuts a slot back to any position, which a window-sized cache cannot do.
    ctx_params.swa_full = True
    ctx = llama_cpp.llama_init_from_model(model, ctx_params)
    if not ctx:
        llama_cpp.llama_model_free(model)
        raise ModelLoadError("llama.cpp could not create a context (n_ctx too large?)")

    mctx = None
    try:  # whatever fails from here (projector, template, vocab), nothing stays loaded
        if settings.mmproj:
            mctx = _load_projector(settings, model, n_threads)
        return _loaded(settings, model, ctx, mctx, n_threads)
    except BaseException:
        if mctx is not None:
            mtmd_cpp.mtmd_free(mctx)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
        raise


def _loaded(settings: Settings, model: llama_cpp.llama_model_p, ctx: llama_cpp.llama_context_p,
            mctx: mtmd_cpp.mtmd_context_p | None, n_threads: int) -> LoadedModel:
    """What the scheduler needs per token, read once from the loaded model."""
    vocab = llama_cpp.llama_model_get_vocab(model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    pieces = [token_piece(vocab, t, special=False) for t in range(n_vocab)]
    marker = (mtmd_cpp.mtmd_default_marker() or b"<__media__>").decode()
    projector = read_projector_info(Path(settings.mmproj)) if settings.mmproj else None
    chosen = _choose_template(settings, model)
    template = ChatTemplate(
        chosen.template,
        bos_token=_special_text(vocab, llama_cpp.llama_vocab_bos(vocab)),
        eos_token=_special_text(vocab, llama_cpp.llama_vocab_eos(vocab)),
        media_marker=marker,
        # mtmd adds BOS only when the vocab says so; otherwise the template's own is needed.
        strip_bos=bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
        part_separator="" if projector is not None and projector.wraps_images else "\n",
    )
    eog = {t for t in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)}
    special_texts, max_token_bytes = _text_bounds(vocab, n_vocab)
    marker_tokens = {t for s in chosen.stops
                     if (t := single_control_token(vocab, s, pieces)) is not None}
    geometries = detail_geometries(settings, projector) if projector is not None else None
    build = read_build_info()
    info = {
        "model_path": str(settings.model),
        "mmproj_path": str(settings.mmproj) if settings.mmproj else None,
        # What the model reads: the API refuses images up front when it is text only.
        "vision": projector is not None,
        "input": "text and images" if projector is not None else "text only",
        "chat_template": chosen.meta(),
        # Answers split into reasoning_content and content (server/api/reasoning.py).
        "reasoning": template.thinks and settings.reasoning_format == "auto",
        "description": _meta(model, "general.description") or "",
        "n_ctx": llama_cpp.llama_n_ctx(ctx),
        "n_ctx_train": llama_cpp.llama_model_n_ctx_train(model),
        "n_vocab": n_vocab,
        "n_params": llama_cpp.llama_model_n_params(model),
        "n_layers": llama_cpp.llama_model_n_layer(model),
        "n_parallel": settings.n_parallel,
        "n_threads": n_threads,
        # What the build offers; where the model landed is read back from the log
        # (update_placement: placement, gpu_layers, projector_on_gpu).
        "gpu_build": build.gpu_offload,
        "llama_cpp_python": build.llama_cpp_python,
        "backends": build.backends,
        **_projector_info(mctx, projector, geometries),
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
    }
    return LoadedModel(
        model=model,
        ctx=ctx,
        vocab=vocab,
        mtmd=mctx,
        n_ctx=llama_cpp.llama_n_ctx(ctx),
        n_batch=llama_cpp.llama_n_batch(ctx),
        n_vocab=n_vocab,
        pieces=pieces,
        eog_tokens=frozenset(eog | marker_tokens),
        strip_first_space=llama_cpp.llama_vocab_type(vocab) == llama_cpp.LLAMA_VOCAB_TYPE_SPM,
        space_prefix=_space_prefix(vocab, pieces),
        template=template,
        media_marker=marker,
        stop_strings=chosen.stops,
        special_texts=special_texts,
        max_token_bytes=max_token_bytes,
        next_turn_markup=turn_markup(template, MarkupSplitter(special_texts, marker), vocab),
        info=info,
    )


def _load_projector(settings: Settings, model: llama_cpp.llama_model_p, n_threads: int
                    ) -> mtmd_cpp.mtmd_context_p:
    mtmd_params = mtmd_cpp.mtmd_context_params_default()
    mtmd_params.use_gpu = settings.mmproj_use_gpu
    mtmd_params.n_threads = n_threads
    mtmd_params.print_timings = False
    mtmd_params.warmup = False  # our own warm-up runs the whole request path instead
    # Dynamic-resolution projectors only; others ignore it. mtmd gets the largest budget
    # (`high` detail): smaller ones are met by decoding to their size, which mtmd keeps.
    if settings.image_high_max_tokens:
        mtmd_params.image_max_tokens = settings.image_high_max_tokens
    mctx = mtmd_cpp.mtmd_init_from_file(str(settings.mmproj).encode(), model, mtmd_params)
    if not mctx:
        raise ModelLoadError(f"mtmd could not load the projector {settings.mmproj}")
    if not mtmd_cpp.mtmd_support_vision(mctx):
        mtmd_cpp.mtmd_free(mctx)
        raise ModelLoadError(f"{settings.mmproj} has no vision encoder")
    return mctx


def detail_geometries(settings: Settings, projector: ProjectorInfo
                      ) -> dict[str, ImageGeometry]:
    """The decode size for each image `detail`: `auto` within image_max_side/_tokens,
    `low` within the low caps (never above auto's), `high` within the high ones."""
    auto_side, auto_tokens = settings.image_max_side, settings.image_max_tokens
    low_tokens = min(settings.image_low_max_tokens, auto_tokens or settings.image_low_max_tokens)
    return {
        "auto": projector.geometry(auto_side, auto_tokens),
        "low": projector.geometry(min(settings.image_low_max_side, auto_side), low_tokens),
        "high": projector.geometry(settings.image_high_max_side, settings.image_high_max_tokens),
    }


def _geometry_info(geometry: ImageGeometry) -> dict[str, Any]:
    return {
        "image_target_side": geometry.max_side,
        "image_cell": geometry.cell,
        "image_max_tokens": geometry.max_cells,
        "projector_min_pixels": geometry.min_pixels,
        "projector_max_pixels": geometry.max_pixels,
    }


def _projector_info(mctx: mtmd_cpp.mtmd_context_p | None, projector: ProjectorInfo | None,
                    geometries: dict[str, ImageGeometry] | None) -> dict[str, Any]:
    if mctx is None or projector is None or geometries is None:
        return {"projector_type": None}
    return {
        "uses_mrope": bool(mtmd_cpp.mtmd_decode_use_mrope(mctx)),
        "image_non_causal": bool(mtmd_cpp.mtmd_decode_use_non_causal(mctx, None)),
        "projector_type": projector.projector_type,
        "projector_image_size": projector.image_size,
        # Images are decoded straight to what the projector consumes, within the config caps:
        # longest side, and for grid and dynamic projectors whole cells of image_cell px,
        # one token each (dynamic: scaled into projector_min/max_pixels, as mtmd does).
        "image_sizing": projector.kind,
        **_geometry_info(geometries["auto"]),
        # The same for `detail: low` and `detail: high` (identical for fixed-size projectors).
        "image_detail": {d: _geometry_info(geometries[d]) for d in ("low", "high")},
    }


def _choose_template(settings: Settings, model: llama_cpp.llama_model_p) -> ResolvedTemplate:
    """The template table's choice for this model (config → GGUF → family), logged."""
    raw = llama_cpp.llama_model_chat_template(model, None)
    metadata = {
        "tokenizer.chat_template": raw.decode("utf-8", errors="replace") if raw else None,
        "general.architecture": _meta(model, "general.architecture"),
    }
    try:
        chosen = template_for(settings, metadata)
    except TemplateConfigError as exc:
        raise ModelLoadError(str(exc)) from None
    logger.info("chat template: %s (%s); generation stops at %s", chosen.name, chosen.reason,
                ", ".join(repr(s) for s in chosen.stops) or "end-of-generation tokens only")
    return chosen


_SPECIAL = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN


def _text_bounds(vocab: llama_cpp.llama_vocab_p, n_vocab: int
                 ) -> tuple[tuple[str, ...], int | None]:
    """The control tokens' texts, and the most bytes of input text one token can cover.

    A token's stored text is never shorter than the input it covers (SentencePiece stores a
    space as the 3-byte "▁", byte-level BPE a byte as one or two); 4 bytes covers a whole
    character falling back to UNK. WordPiece and Unigram vocabs normalize (drop or fold
    characters), so no such bound holds for them."""
    special: list[str] = []
    longest = 4
    for token in range(n_vocab):
        text = llama_cpp.llama_vocab_get_text(vocab, token) or b""
        longest = max(longest, len(text))
        if llama_cpp.llama_vocab_get_attr(vocab, token) & _SPECIAL and text:
            special.append(text.decode("utf-8", errors="replace"))
    bounded = llama_cpp.llama_vocab_type(vocab) in (llama_cpp.LLAMA_VOCAB_TYPE_SPM,
                                                    llama_cpp.LLAMA_VOCAB_TYPE_BPE)
    return tuple(special), longest if bounded else None


def _space_prefix(vocab: llama_cpp.llama_vocab_p, pieces: list[bytes]) -> bool:
    """Whether the tokenizer puts a space before text, read from what it does (llama.cpp's
    C API does not say): a lone letter comes out as a word-start piece."""
    ids = tokenize_text(vocab, "a", add_special=False, parse_special=False)
    return bool(ids) and pieces[ids[0]].startswith(b" ")


def _special_text(vocab: llama_cpp.llama_vocab_p, token: int) -> str:
    if token < 0:
        return ""
    return token_piece(vocab, token, special=True).decode("utf-8", errors="replace")


def _meta(model: llama_cpp.llama_model_p, key: str) -> str | None:
    buf = ctypes.create_string_buffer(1024)
    n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode("utf-8", errors="replace") if n >= 0 else None
