"""The vision encoder behind the embedding cache: an image chunk's embedding, encoded once per
tenant and reused, and uploads encoded ahead of use. Engine thread only."""

from __future__ import annotations

import ctypes
import logging
import time

import llama_cpp

from server.engine import mtmd
from server.engine.embed_cache import EmbeddingCache, EmbedKey
from server.engine.jobs import remaining_work
from server.engine.model import LoadedModel
from server.engine.types import ImageInput
from server.engine.watchdog import Watchdog
from server.timings import StageTimer

logger = logging.getLogger("vlserve.engine")


class ImageEncoder:
    def __init__(self, model: LoadedModel, cache_bytes: int, watchdog: Watchdog) -> None:
        self.model = model
        self.embeddings = EmbeddingCache(cache_bytes)
        self.watchdog = watchdog
        self._row_bytes = llama_cpp.llama_model_n_embd_inp(model.model) * 4

    def embedding(self, chunk: mtmd.PromptChunk, key: EmbedKey, timer: StageTimer,
                  count_hit: bool = True) -> ctypes._Pointer:
        """The chunk's embedding, from the cache or the encoder (timed as image_encode).
        Raises mtmd.MediaError."""
        cached = self.embeddings.get(key)
        if cached is not None:
            timer.image_cache_hits += int(count_hit)
            return ctypes.cast(ctypes.c_char_p(cached), ctypes.POINTER(ctypes.c_float))
        t0 = time.perf_counter()
        with self.watchdog.watch("an image encode"):
            embd = mtmd.encode_image(self.model.mtmd, chunk)
        self.embeddings.put(key, ctypes.string_at(embd, self._row_bytes * chunk.n_tokens))
        timer.add("image_encode", time.perf_counter() - t0)
        return embd

    def encode_ahead(self, image: ImageInput, tenant: str) -> None:
        """Pre-encode an uploaded image so a later chat skips the vision encoder."""
        if self.model.mtmd is None:
            return
        try:
            prompt = mtmd.tokenize_parts(self.model.mtmd, [image])
        except mtmd.MediaError as exc:
            logger.warning("pre-encoding image %s failed: %s", image.content_hash, exc)
            return
        try:
            for item in remaining_work(prompt.chunks, 0, tenant):
                if item.embed_key is None or item.embed_key in self.embeddings:
                    continue
                with self.watchdog.watch("an image encode (ahead of use)"):
                    embd = mtmd.encode_image(self.model.mtmd, item.chunk)
                self.embeddings.put(item.embed_key, ctypes.string_at(
                    embd, self._row_bytes * item.chunk.n_tokens))
        except mtmd.MediaError as exc:
            logger.warning("pre-encoding image %s failed: %s", image.content_hash, exc)
        finally:
            prompt.close()
