"""Multimodal tokenization and image-chunk evaluation through llama.cpp's mtmd library."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import llama_cpp
from llama_cpp import mtmd_cpp

from server.engine.textparts import Part, Special
from server.engine.types import ImageInput


class MediaError(RuntimeError):
    """mtmd rejected the input (e.g. the image could not be preprocessed)."""


@dataclass(frozen=True)
class ImageKey:
    """Stands for a whole image chunk in a slot's KV record."""

    content_hash: str  # the bitmap id: ImageInput.cache_id (content and decoded size)
    n_pos: int
    n_tokens: int


@dataclass(frozen=True)
class PromptChunk:
    tokens: tuple[int, ...]  # text chunks only
    image: ImageKey | None  # image chunks only
    n_tokens: int
    handle: int  # mtmd_input_chunk pointer, valid while its TokenizedPrompt is open


class TokenizedPrompt:
    """Owns the mtmd chunk list (none for a text-only model's prompt); close() frees it
    once every holder (share() adds one: the choices of an `n > 1` request) has closed it."""

    def __init__(self, handle: int | None, chunks: list[PromptChunk]) -> None:
        self._handle: int | None = handle
        self._holders = 1
        self.chunks = chunks
        self.n_tokens = sum(c.n_tokens for c in chunks)
        self.image_tokens = sum(c.n_tokens for c in chunks if c.image is not None)
        self.n_pos = sum(len(c.tokens) if c.image is None else c.image.n_pos for c in chunks)

    def keys(self) -> list[int | ImageKey]:
        """One entry per KV unit: a token id per text token, one ImageKey per image."""
        out: list[int | ImageKey] = []
        for chunk in self.chunks:
            if chunk.image is None:
                out.extend(chunk.tokens)
            else:
                out.append(chunk.image)
        return out

    def share(self) -> TokenizedPrompt:
        """One more holder (engine thread only): each must close() it."""
        self._holders += 1
        return self

    def close(self) -> None:
        self._holders -= 1
        if self._holders <= 0 and self._handle is not None:
            mtmd_cpp.mtmd_input_chunks_free(self._handle)
            self._handle = None


def tokenize_parts(mctx: int, parts: list[Part]) -> TokenizedPrompt:
    """Tokenize plain text (special parsing off), special tokens' texts and images in order;
    no media markers are involved, so a marker in plain text stays text."""
    bitmaps: list[int] = []
    chunks_handle = mtmd_cpp.mtmd_input_chunks_init()
    try:
        texts: list[bytes] = []  # kept alive until mtmd has read them
        inputs = (mtmd_cpp.mtmd_input_text * max(1, len(parts)))()
        records = (mtmd_cpp.mtmd_input_part * max(1, len(parts)))()
        for i, part in enumerate(parts):
            if isinstance(part, ImageInput):
                bitmaps.append(_bitmap(part))
                records[i].bitmap = bitmaps[-1]
                continue
            special = isinstance(part, Special)
            raw = (part.text if isinstance(part, Special) else part).encode("utf-8")
            texts.append(raw)
            inputs[i] = mtmd_cpp.mtmd_input_text(raw, len(raw), False, special)
            records[i].text = ctypes.pointer(inputs[i])
        pointers = (ctypes.POINTER(mtmd_cpp.mtmd_input_part) * max(1, len(parts)))(
            *(ctypes.pointer(records[i]) for i in range(len(parts))))
        ret = mtmd_cpp.mtmd_tokenize_from_parts(mctx, chunks_handle, pointers, len(parts), True)
        if ret != 0:
            raise MediaError(f"multimodal tokenization failed (error {ret}): an image could "
                             "not be preprocessed")
        chunks = [_describe(mtmd_cpp.mtmd_input_chunks_get(chunks_handle, i))
                  for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks_handle))]
    except BaseException:
        mtmd_cpp.mtmd_input_chunks_free(chunks_handle)
        raise
    finally:
        for bitmap in bitmaps:
            mtmd_cpp.mtmd_bitmap_free(bitmap)
    return TokenizedPrompt(chunks_handle, chunks)


def encode_image(mctx: int, chunk: PromptChunk) -> ctypes.Array | ctypes._Pointer:
    """Run the vision encoder; returns mtmd's output embedding buffer (valid until next call)."""
    if mtmd_cpp.mtmd_encode_chunk(mctx, chunk.handle) != 0:
        raise MediaError("the vision encoder failed on an image")
    return mtmd_cpp.mtmd_get_output_embd(mctx)


def decode_image(
    mctx: int, lctx: int, chunk: PromptChunk, embd: ctypes._Pointer, n_past: int, seq_id: int,
    n_batch: int,
) -> int:
    """Write an encoded image into the KV cache; returns the new n_past."""
    new_n_past = llama_cpp.llama_pos(0)
    ret = mtmd_cpp.mtmd_helper_decode_image_chunk(
        mctx, lctx, chunk.handle, embd, n_past, seq_id, n_batch, ctypes.byref(new_n_past),
        mtmd_cpp.mtmd_helper_post_decode_callback(), None,
    )
    if ret != 0:
        raise MediaError(f"decoding image embeddings failed (error {ret})")
    return new_n_past.value


def _bitmap(image: ImageInput) -> int:
    if len(image.rgb) != image.width * image.height * 3:
        raise MediaError("image buffer size does not match its dimensions")
    data = ctypes.cast(ctypes.c_char_p(image.rgb), ctypes.POINTER(ctypes.c_uint8))
    bitmap = mtmd_cpp.mtmd_bitmap_init(image.width, image.height, data)
    if not bitmap:
        raise MediaError("could not create an image bitmap")
    mtmd_cpp.mtmd_bitmap_set_id(bitmap, image.cache_id.encode())
    return bitmap


def _describe(handle: int) -> PromptChunk:
    kind = mtmd_cpp.mtmd_input_chunk_get_type(handle)
    if kind == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_TEXT:
        n = ctypes.c_size_t(0)
        ptr = mtmd_cpp.mtmd_input_chunk_get_tokens_text(handle, ctypes.byref(n))
        tokens = tuple(ptr[: n.value]) if n.value else ()
        return PromptChunk(tokens=tokens, image=None, n_tokens=len(tokens), handle=handle)
    if kind != mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_IMAGE:
        raise MediaError("only text and image inputs are supported")
    chunk_id = (mtmd_cpp.mtmd_input_chunk_get_id(handle) or b"").decode()
    n_pos = mtmd_cpp.mtmd_input_chunk_get_n_pos(handle)
    n_tokens = mtmd_cpp.mtmd_input_chunk_get_n_tokens(handle)
    key = ImageKey(content_hash=chunk_id, n_pos=n_pos, n_tokens=n_tokens)
    return PromptChunk(tokens=(), image=key, n_tokens=n_tokens, handle=handle)
