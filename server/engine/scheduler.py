"""Request queue → slots → one decode batch per step. Runs on the engine thread only.

Each step puts the next token of every generating slot, plus up to a batch's worth of
prompt tokens from slots that are still prefilling, into one llama_batch; decodes once;
samples each slot. A long prompt is thereby spread over several steps instead of stalling
the other streams. Images are encoded (or taken from the embedding cache) and written into
their slot's sequence between steps.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import llama_cpp

from server.config import Settings
from server.engine import mtmd
from server.engine.admission import CLIENT_GONE, Inbox, Pending, QueueFullError, Sink
from server.engine.batch import TokenBatch
from server.engine.detokenize import TextStream
from server.engine.embed_cache import EmbeddingCache, EmbedKey
from server.engine.logprobs import token_logprob
from server.engine.model import LoadedModel
from server.engine.prefix import KvKey, common_prefix_len, n_positions, n_tokens
from server.engine.sampling import GrammarError, TokenSampler, build_sampler
from server.engine.types import (
    DoneEvent,
    EngineEvent,
    ErrorEvent,
    GenerationRequest,
    ImageInput,
    TokenEvent,
)

logger = logging.getLogger("vlserve.engine")

__all__ = ["QueueFullError", "Scheduler", "Sink"]

PREENCODE_BACKLOG = 16  # uploaded images waiting for an idle engine to encode them


@dataclass
class PrefillItem:
    """A prompt chunk still to evaluate; for text, `start` is the first token not yet in KV."""

    chunk: mtmd.PromptChunk
    start: int = 0
    embed_key: EmbedKey | None = None


@dataclass
class Job:
    request: GenerationRequest
    sink: Sink
    sampler: TokenSampler
    text: TextStream
    max_new: int
    prompt: mtmd.TokenizedPrompt
    work: deque[PrefillItem]
    deadline: float
    prompt_done_at: float = 0.0
    n_generated: int = 0
    next_token: int = -1  # sampled, to be fed to the next decode step
    saw_first_token: bool = False
    held_text: list[str] | None = None  # non-streaming: the answer, sent whole at the end


@dataclass
class Slot:
    seq_id: int
    cached: list[KvKey] = field(default_factory=list)  # what this sequence's KV holds
    # Whose data `cached` is: only that tenant may reuse it. The warm-up's prefix counts as
    # the keyless tenant's (""): with keys on, probing it could spell out the operator's
    # system prompt.
    tenant: str = ""
    n_past: int = 0  # KV positions used by this sequence
    job: Job | None = None


@dataclass
class _Prefilled:
    slot: Slot
    item: PrefillItem
    n: int
    last_index: int  # batch index of the prompt's last token, or -1


class Scheduler:
    def __init__(self, model: LoadedModel, settings: Settings) -> None:
        self.model = model
        self.settings = settings
        self.slots = [Slot(seq_id=i) for i in range(settings.n_parallel)]
        self.embeddings = EmbeddingCache(settings.image_cache_mb * 1024 * 1024)
        self._inbox = Inbox()
        # Once set (shutdown, engine failure), every request, queued or new, gets this event.
        self._refusal: ErrorEvent | None = None
        self._submit_lock = threading.Lock()
        # Bounded: the engine encodes ahead only when idle, so under steady load this would
        # grow by one decoded image per upload, for as long as the load lasts.
        self._preencode: deque[tuple[ImageInput, str]] = deque(maxlen=PREENCODE_BACKLOG)
        self._batch = TokenBatch(max(model.n_batch, settings.n_parallel))
        self._mem = llama_cpp.llama_get_memory(model.ctx)
        self._embd_row_bytes = llama_cpp.llama_model_n_embd_inp(model.model) * 4

    # --- any thread -------------------------------------------------------------------
    def submit(self, request: GenerationRequest, prompt: mtmd.TokenizedPrompt, sink: Sink
               ) -> None:
        """Queue a prepared request; from here on the engine owns (and frees) `prompt`."""
        pending = Pending(request, prompt, sink)
        # Requests for free slots pass straight through; beyond them, max_queue may wait.
        # (Reading busy_slots from another thread is racy by at most one admission.)
        with self._submit_lock:  # no request slips into the inbox after refuse_all drained it
            if self._refusal is not None:
                pending.answer(self._refusal)
                return
            free_slots = len(self.slots) - self.busy_slots
            try:
                self._inbox.put(pending, self.settings.max_queue + free_slots)
            except QueueFullError:
                prompt.close()
                raise QueueFullError(
                    f"the request queue is full ({self.settings.max_queue} waiting)") from None

    def submit_preencode(self, image: ImageInput, tenant: str = "") -> None:
        """Encode an image into `tenant`'s embedding cache when the engine is idle.

        Best effort: past PREENCODE_BACKLOG waiting images the oldest is dropped (a chat that
        references it encodes it then)."""
        self._preencode.append((image, tenant))  # deque.append from another thread: atomic

    def is_encoded(self, cache_id: str, tenant: str = "") -> bool:
        return (tenant, cache_id, 0) in self.embeddings

    @property
    def preencode_backlog(self) -> int:
        return len(self._preencode)

    @property
    def queue_depth(self) -> int:
        return len(self._inbox)

    @property
    def busy_slots(self) -> int:
        return sum(1 for s in self.slots if s.job is not None)

    def slot_states(self) -> list[dict[str, object]]:
        out = []
        for slot in self.slots:
            job = slot.job
            out.append({
                "id": slot.seq_id,
                "state": "idle" if job is None else "prefill" if job.work else "generating",
                "request_id": job.request.request_id if job else None,
                "client": job.request.client if job else None,
                "n_past": slot.n_past,
                "generated_tokens": job.n_generated if job else 0,
            })
        return out

    @property
    def kv_cells_used(self) -> int:
        """KV positions held by all sequences, idle slots' reusable prefixes included."""
        return sum(s.n_past for s in self.slots)

    # --- engine thread ----------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            for pending in self._inbox.take_cancelled():
                pending.drop_cancelled()
            self._admit(block=not self.busy_slots and not self._preencode)
            if self.busy_slots:
                self._step()
            elif self._preencode:
                self._encode_ahead(*self._preencode.popleft())
        self.refuse_all(ErrorEvent(503, "the server is shutting down",
                                   code="server_shutting_down"))

    def refuse_all(self, event: ErrorEvent) -> None:
        """End every request, running or queued, with `event`; later ones get it at once."""
        with self._submit_lock:
            self._refusal = event
        for slot in self.slots:
            if slot.job is not None:
                self._end(slot, event)
        for pending in self._inbox.take_all():
            pending.answer(event)

    def run_to_completion(self, request: GenerationRequest, prompt: mtmd.TokenizedPrompt,
                          sink: Sink) -> None:
        """Serve one request synchronously (warm-up, before the loop starts)."""
        self.submit(request, prompt, sink)
        self._admit(block=False)
        while self.busy_slots:
            self._step()

    def share_prefix_of_slot(self, source: int = 0) -> None:
        """Let every slot start from `source`'s KV (e.g. the warmed-up system prompt);
        with a unified KV cache the cells are shared, not copied."""
        origin = self.slots[source]
        for slot in self.slots:
            if slot is origin or slot.job is not None:
                continue
            llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
            llama_cpp.llama_memory_seq_cp(self._mem, origin.seq_id, slot.seq_id, -1, -1)
            slot.cached = list(origin.cached)
            slot.n_past = origin.n_past
            slot.tenant = origin.tenant

    def _admit(self, block: bool) -> None:
        while any(s.job is None for s in self.slots):
            pending = self._inbox.get(timeout=0.2 if block else 0)
            if pending is None:
                return
            block = False
            pending.request.timer.add("queue", time.perf_counter() - pending.queued_at)
            if pending.request.cancelled.is_set():
                pending.drop_cancelled()
            else:
                self._start_guarded(pending)

    def _start_guarded(self, pending: Pending) -> None:
        """One request's unexpected failure answers that request with a 500; it must never
        take the engine loop (and every other request) down with it."""
        try:
            self._start(pending)
        except Exception:
            logger.exception("preparing request %s failed", pending.request.request_id)
            for slot in self.slots:
                if slot.job is not None and slot.job.request is pending.request:
                    self._forget(slot)
                    self._end(slot, ErrorEvent(500, "the engine failed on this request"))
                    return
            pending.answer(ErrorEvent(500, "the engine failed on this request"))

    def _start(self, pending: Pending) -> None:
        """Pick a slot, keep its reusable KV prefix and queue the rest of the prompt as work."""
        request, prompt, sink = pending.request, pending.prompt, pending.sink
        timer = request.timer
        model = self.model
        try:
            sampler = build_sampler(request.sampling, model.vocab, model.utf8, model.eog_tokens,
                                    timer)
        except GrammarError as exc:
            pending.answer(ErrorEvent(400, f"response_format: {exc}", code="invalid_grammar"))
            return
        keys = prompt.keys()
        slot, keep = self._pick_slot(keys, request.tenant)
        kept = keys[:keep]
        slot.n_past = n_positions(kept)
        llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, slot.n_past, -1)
        del slot.cached[keep:]
        slot.tenant = request.tenant
        timer.cached_tokens = n_tokens(kept)
        # Images already in the slot's KV are reused without the encoder, like cache hits.
        timer.image_cache_hits += sum(1 for k in kept if not isinstance(k, int))
        slot.job = Job(
            request=request,
            sink=sink,
            sampler=sampler,
            # The template's next-turn markers end the answer too, except for benchmarks
            # that ask to run to max_tokens whatever the model writes.
            text=TextStream(request.stop + (() if request.sampling.ignore_eos
                                            else model.stop_strings)),
            max_new=request.max_tokens,
            prompt=prompt,
            work=_remaining_work(prompt, keep, request.tenant),
            deadline=time.perf_counter() + (request.timeout_s or self.settings.request_timeout),
            held_text=None if request.stream or request.top_logprobs is not None else [],
        )

    def _pick_slot(self, keys: list[KvKey], tenant: str) -> tuple[Slot, int]:
        """The free slot sharing the longest prefix, and how many entries of it to keep;
        idle caches are dropped if the prompt might not fit beside them. Another tenant's
        cache is worth nothing: how much of it matched would tell what it holds."""
        free = [s for s in self.slots if s.job is None]
        # Ties go to the shorter cache, then to the lower slot (slots[i].seq_id == i).
        keep, _, neg_seq = max((common_prefix_len(s.cached, keys) if s.tenant == tenant else 0,
                                -len(s.cached), -s.seq_id)
                               for s in free)
        best = self.slots[-neg_seq]
        # KV cells, not positions: an M-RoPE image (GLM-4V, Qwen) takes a cell per token but
        # fewer positions (a large `detail: high` image: 782 cells at 46 positions).
        used = sum(n_tokens(s.cached) for s in self.slots if s is not best)
        if used + n_tokens(keys) > self.model.n_ctx:
            for other in free:
                if other is not best:
                    self._forget(other)
        return best, keep

    def _step(self) -> None:
        now = time.perf_counter()
        for slot in self.slots:
            job = slot.job
            if job is None:
                continue
            if job.request.cancelled.is_set():
                logger.info("request %s cancelled (client gone) after %d tokens; slot %d freed",
                            job.request.request_id, job.n_generated, slot.seq_id)
                job.request.timer.completion_tokens = job.n_generated
                job.request.timer.mark_since_start("total")
                self._end(slot, CLIENT_GONE)
            elif now > job.deadline:
                self._end(slot, ErrorEvent(504, "the request took longer than its time limit "
                                           f"({self.settings.request_timeout:g} s)",
                                           code="timeout"))
            elif job.work and job.work[0].chunk.image is not None:
                self._eval_image(slot, job.work.popleft())

        batch = self._batch
        batch.clear()
        generating = [s for s in self.slots if s.job is not None and s.job.next_token >= 0]
        for slot in generating:
            batch.add(slot.job.next_token, slot.n_past, slot.seq_id, True)  # type: ignore[union-attr]
        prefilled = self._add_prompt_tokens(batch)
        if batch.n == 0:
            return
        t0 = time.perf_counter()
        ret = batch.decode(self.model.ctx)
        if ret == 1:  # no room in the KV cache: drop idle slots' caches and retry once
            for slot in self.slots:
                if slot.job is None:
                    self._forget(slot)
            ret = batch.decode(self.model.ctx)
        if ret != 0:
            self._decode_failed(ret, generating, prefilled)
            return
        decode_s = time.perf_counter() - t0
        ctx = self.model.ctx
        for i, slot in enumerate(generating):
            job = slot.job
            assert job is not None
            slot.cached.append(job.next_token)
            slot.n_past += 1
            self._sample(slot, ctx, i)
        for part in prefilled:
            self._prefill_done(part, decode_s)

    def _add_prompt_tokens(self, batch: TokenBatch) -> list[_Prefilled]:
        """Fill the rest of the batch with prompt text of prefilling slots, oldest first."""
        prefilled: list[_Prefilled] = []
        budget = batch.capacity - batch.n
        for slot in self.slots:
            job = slot.job
            if budget <= 0:
                break
            if job is None or not job.work or job.work[0].chunk.image is not None:
                continue
            item = job.work[0]
            tokens = item.chunk.tokens
            n = min(budget, len(tokens) - item.start)
            ends_prompt = item.start + n == len(tokens) and len(job.work) == 1
            for j in range(n):
                batch.add(tokens[item.start + j], slot.n_past + j, slot.seq_id,
                          ends_prompt and j == n - 1)
            prefilled.append(_Prefilled(slot, item, n, batch.n - 1 if ends_prompt else -1))
            budget -= n
        return prefilled

    def _prefill_done(self, part: _Prefilled, decode_s: float) -> None:
        slot, item = part.slot, part.item
        job = slot.job
        if job is None:
            return
        slot.cached.extend(item.chunk.tokens[item.start:item.start + part.n])
        slot.n_past += part.n
        item.start += part.n
        job.request.timer.add("prompt_eval", decode_s)
        if item.start == len(item.chunk.tokens):
            job.work.popleft()
        if part.last_index >= 0:
            job.prompt_done_at = time.perf_counter()
            job.prompt.close()
            self._sample(slot, self.model.ctx, part.last_index)

    def _eval_image(self, slot: Slot, item: PrefillItem) -> None:
        job = slot.job
        assert job is not None and item.chunk.image is not None and item.embed_key is not None
        timer = job.request.timer
        model = self.model
        try:
            cached = self.embeddings.get(item.embed_key)
            if cached is None:
                t0 = time.perf_counter()
                embd = mtmd.encode_image(model.mtmd, item.chunk)
                self.embeddings.put(item.embed_key, ctypes.string_at(
                    embd, self._embd_row_bytes * item.chunk.n_tokens))
                timer.add("image_encode", time.perf_counter() - t0)
            else:
                timer.image_cache_hits += 1
                embd = ctypes.cast(ctypes.c_char_p(cached), ctypes.POINTER(ctypes.c_float))
            t1 = time.perf_counter()
            slot.n_past = mtmd.decode_image(model.mtmd, model.ctx, item.chunk, embd,
                                            slot.n_past, slot.seq_id, model.n_batch)
            slot.cached.append(item.chunk.image)
            timer.add("prompt_eval", time.perf_counter() - t1)
        except mtmd.MediaError as exc:
            logger.error("image failed in request %s: %s", job.request.request_id, exc)
            self._forget(slot)
            self._end(slot, ErrorEvent(500, str(exc), code="image_failed"))

    def _encode_ahead(self, image: ImageInput, tenant: str) -> None:
        """Pre-encode an uploaded image so a later chat skips the vision encoder."""
        if self.model.mtmd is None:
            return
        try:
            prompt = mtmd.tokenize_parts(self.model.mtmd, [image])
        except mtmd.MediaError as exc:
            logger.warning("pre-encoding image %s failed: %s", image.content_hash, exc)
            return
        try:
            for item in _remaining_work(prompt, 0, tenant):
                if item.embed_key is None or item.embed_key in self.embeddings:
                    continue
                embd = mtmd.encode_image(self.model.mtmd, item.chunk)
                self.embeddings.put(item.embed_key, ctypes.string_at(
                    embd, self._embd_row_bytes * item.chunk.n_tokens))
        except mtmd.MediaError as exc:
            logger.warning("pre-encoding image %s failed: %s", image.content_hash, exc)
        finally:
            prompt.close()

    def _sample(self, slot: Slot, ctx: llama_cpp.llama_context_p, batch_index: int) -> None:
        job = slot.job
        assert job is not None
        try:
            token = job.sampler.sample(ctx, batch_index)
        except GrammarError as exc:
            logger.warning("request %s: %s", job.request.request_id, exc)
            self._end(slot, ErrorEvent(500, f"constrained sampling failed: {exc}",
                                       code="grammar_dead_end"))
            return
        self._on_token(slot, token, batch_index)

    def _on_token(self, slot: Slot, token: int, batch_index: int) -> None:
        job = slot.job
        assert job is not None
        if not job.saw_first_token:
            job.saw_first_token = True
            job.request.timer.mark_since_start("first_token")
        if token in self.model.eog_tokens:
            self._finish(slot, "stop")
            return
        piece = self.model.pieces[token]
        if job.n_generated == 0 and self.model.strip_first_space and piece.startswith(b" "):
            piece = piece[1:]
        job.n_generated += 1
        text = job.text.push(piece)
        top_k = job.request.top_logprobs
        if top_k is not None:
            model = self.model
            job.sink.put(TokenEvent(text, token_logprob(model.ctx, batch_index, model.n_vocab,
                                                        token, top_k, model.pieces)))
        elif job.held_text is not None:
            job.held_text.append(text)
        elif text:
            job.sink.put(TokenEvent(text))
        if job.text.stopped:
            self._finish(slot, "stop")
        elif job.n_generated >= job.max_new or slot.n_past >= self.model.n_ctx:
            self._finish(slot, "length")
        else:
            job.next_token = token

    def _decode_failed(self, ret: int, generating: list[Slot], prefilled: list[_Prefilled]
                       ) -> None:
        logger.error("llama_decode failed (%d) with %d generating, %d prefilling sequences",
                     ret, len(generating), len(prefilled))
        for slot in generating:
            self._finish(slot, "length")
        for part in prefilled:
            self._forget(part.slot)
            self._end(part.slot, ErrorEvent(503, "the KV cache is full; retry shortly",
                                            code="kv_cache_full"))

    def _finish(self, slot: Slot, reason: str) -> None:
        job = slot.job
        assert job is not None
        text = job.text.finish()
        if job.held_text is not None:
            text = "".join(job.held_text) + text
        if text:
            job.sink.put(TokenEvent(text))
        timer = job.request.timer
        timer.completion_tokens = job.n_generated
        if job.prompt_done_at:
            timer.add("generation", time.perf_counter() - job.prompt_done_at)
        timer.mark_since_start("total")
        self._end(slot, DoneEvent(reason, timer))  # type: ignore[arg-type]

    def _end(self, slot: Slot, event: EngineEvent) -> None:
        job = slot.job
        assert job is not None
        job.sampler.free()
        job.prompt.close()
        slot.job = None
        job.sink.put(event)

    def _forget(self, slot: Slot) -> None:
        llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
        slot.cached.clear()
        slot.n_past = 0

    def close(self) -> None:
        for slot in self.slots:
            if slot.job is not None:
                self._end(slot, ErrorEvent(503, "the server is shutting down",
                                           code="server_shutting_down"))
        self._batch.close()


def _remaining_work(prompt: mtmd.TokenizedPrompt, keep: int, tenant: str
                    ) -> deque[PrefillItem]:
    """The prompt's chunks after the first `keep` KV entries, as prefill work; images are
    looked up in `tenant`'s part of the embedding cache."""
    work: deque[PrefillItem] = deque()
    index = 0
    seen: dict[str, int] = {}
    for chunk in prompt.chunks:
        if chunk.image is None:
            skip = max(0, keep - index)
            index += len(chunk.tokens)
            if skip < len(chunk.tokens):
                work.append(PrefillItem(chunk, start=skip))
            continue
        ordinal = seen.get(chunk.image.content_hash, 0)
        seen[chunk.image.content_hash] = ordinal + 1
        index += 1
        if index > keep:
            work.append(PrefillItem(chunk, embed_key=(tenant, chunk.image.content_hash,
                                                      ordinal)))
    return work
