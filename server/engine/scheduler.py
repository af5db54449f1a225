"""Request queue → slots → one decode batch per step. Runs on the engine thread only."""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

import llama_cpp

from server.config import Settings
from server.engine import mtmd
from server.engine.batch import TokenBatch
from server.engine.detokenize import TextStream
from server.engine.model import LoadedModel
from server.engine.prefix import KvKey, common_prefix_len, n_positions, n_tokens
from server.engine.prompt import PromptError
from server.engine.sampling import build_sampler_chain
from server.engine.types import (
    DoneEvent,
    EngineEvent,
    ErrorEvent,
    GenerationRequest,
    TokenEvent,
)
from server.timings import StageTimer

logger = logging.getLogger("vlserve.engine")


class QueueFullError(RuntimeError):
    pass


class DecodeError(RuntimeError):
    pass


class Sink(Protocol):
    def put(self, event: EngineEvent) -> None: ...


@dataclass
class Job:
    request: GenerationRequest
    sink: Sink
    sampler: int
    text: TextStream
    max_new: int
    prompt_done_at: float = 0.0
    n_generated: int = 0
    next_token: int = -1  # sampled, to be fed to the next decode step
    saw_first_token: bool = False


@dataclass
class Slot:
    seq_id: int
    cached: list[KvKey] = field(default_factory=list)  # what this sequence's KV holds
    n_past: int = 0  # KV positions used by this sequence
    job: Job | None = None


class Scheduler:
    def __init__(self, model: LoadedModel, settings: Settings) -> None:
        self.model = model
        self.settings = settings
        self.slots = [Slot(seq_id=i) for i in range(settings.n_parallel)]
        self._inbox: queue.Queue[tuple[GenerationRequest, Sink, float]] = queue.Queue(
            maxsize=settings.max_queue
        )
        self._batch = TokenBatch(max(model.n_batch, settings.n_parallel))
        self._mem = llama_cpp.llama_get_memory(model.ctx)

    # --- any thread -------------------------------------------------------------------
    def submit(self, request: GenerationRequest, sink: Sink) -> None:
        try:
            self._inbox.put_nowait((request, sink, time.perf_counter()))
        except queue.Full:
            raise QueueFullError(f"the request queue is full ({self.settings.max_queue})") from None

    @property
    def queue_depth(self) -> int:
        return self._inbox.qsize()

    @property
    def busy_slots(self) -> int:
        return sum(1 for s in self.slots if s.job is not None)

    @property
    def kv_cells_used(self) -> int:
        """KV positions held by all sequences, idle slots' reusable prefixes included."""
        return sum(s.n_past for s in self.slots)

    # --- engine thread ----------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self._admit(block=self.busy_slots == 0)
            if self.busy_slots:
                self._step()
        self._fail_queued(503, "the server is shutting down")

    def run_to_completion(self, request: GenerationRequest, sink: Sink) -> None:
        """Serve one request synchronously (warm-up, before the loop starts)."""
        self.submit(request, sink)
        self._admit(block=False)
        while self.busy_slots:
            self._step()

    def _admit(self, block: bool) -> None:
        while any(s.job is None for s in self.slots):
            try:
                request, sink, queued_at = self._inbox.get(timeout=0.2 if block else 0)
            except queue.Empty:
                return
            block = False
            request.timer.add("queue", time.perf_counter() - queued_at)
            if request.cancelled.is_set():
                continue
            self._start(request, sink)

    def _start(self, request: GenerationRequest, sink: Sink) -> None:
        timer = request.timer
        model = self.model
        try:
            rendered = model.template.render(request.messages, self.settings.system_prompt)
            t0 = time.perf_counter()
            prompt = mtmd.tokenize(model.mtmd, rendered.text, rendered.images)
        except (PromptError, mtmd.MediaError) as exc:
            sink.put(ErrorEvent(400, str(exc)))
            return
        # Image preprocessing (resize/normalize for the projector) dominates tokenization
        # when images are present, so it is booked as part of the image encode stage.
        timer.add("image_encode" if rendered.images else "prompt_eval", time.perf_counter() - t0)
        try:
            timer.prompt_tokens = prompt.n_tokens
            timer.image_tokens = prompt.image_tokens
            if prompt.n_pos > model.n_ctx - 1:
                sink.put(ErrorEvent(
                    400,
                    f"the prompt is {prompt.n_tokens} tokens ({prompt.image_tokens} of them "
                    f"from images) but the context holds {model.n_ctx - 1}; shorten the "
                    "conversation or send fewer/smaller images",
                    code="context_length_exceeded",
                ))
                return
            if prompt.chunks[-1].image is not None:
                sink.put(ErrorEvent(400, "the prompt must not end with an image"))
                return
            keys = prompt.keys()
            slot = self._pick_slot(keys)
            job = Job(
                request=request,
                sink=sink,
                sampler=build_sampler_chain(request.sampling, model.n_vocab),
                text=TextStream(request.stop),
                max_new=request.max_tokens,
            )
            slot.job = job
            try:
                self._prefill(slot, prompt, keys, timer)
            except Exception as exc:
                logger.exception("prefill failed (request %s)", request.request_id)
                self._forget(slot)
                self._end(slot, ErrorEvent(500, f"the engine failed on this prompt: {exc}"))
                return
            job.prompt_done_at = time.perf_counter()
            self._on_token(slot, llama_cpp.llama_sampler_sample(job.sampler, model.ctx, -1))
        finally:
            prompt.close()

    def _pick_slot(self, keys: list[KvKey]) -> Slot:
        free = [s for s in self.slots if s.job is None]
        best = max(free, key=lambda s: (common_prefix_len(s.cached, keys), -len(s.cached)))
        # Idle slots keep their KV for reuse; drop theirs if this prompt might not fit.
        used = sum(s.n_past for s in self.slots if s is not best)
        if used + n_positions(keys) > self.model.n_ctx:
            for other in free:
                if other is not best:
                    self._forget(other)
        return best

    def _prefill(self, slot: Slot, prompt: mtmd.TokenizedPrompt, keys: list[KvKey],
                 timer: StageTimer) -> None:
        """Evaluate what the slot's KV lacks: keep the common prefix, decode the rest."""
        keep = common_prefix_len(slot.cached, keys)
        keep_pos = n_positions(keys[:keep])
        llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, keep_pos, -1)
        del slot.cached[keep:]
        slot.n_past = keep_pos
        timer.cached_tokens = n_tokens(keys[:keep])
        last = len(prompt.chunks) - 1
        index = 0  # entry index into keys
        for chunk_no, chunk in enumerate(prompt.chunks):
            if chunk.image is None:
                skip = max(0, keep - index)
                index += len(chunk.tokens)
                if skip < len(chunk.tokens):
                    t0 = time.perf_counter()
                    self._decode_text(slot, chunk.tokens[skip:], logits_last=chunk_no == last)
                    timer.add("prompt_eval", time.perf_counter() - t0)
                continue
            index += 1
            if index <= keep:
                continue
            t0 = time.perf_counter()
            embd = mtmd.encode_image(self.model.mtmd, chunk)
            t1 = time.perf_counter()
            slot.n_past = mtmd.decode_image(
                self.model.mtmd, self.model.ctx, chunk, embd, slot.n_past, slot.seq_id,
                self.model.n_batch,
            )
            slot.cached.append(chunk.image)
            timer.add("image_encode", t1 - t0)
            timer.add("prompt_eval", time.perf_counter() - t1)

    def _decode_text(self, slot: Slot, tokens: tuple[int, ...], logits_last: bool) -> None:
        batch = self._batch
        step = batch.capacity
        for offset in range(0, len(tokens), step):
            part = tokens[offset:offset + step]
            batch.clear()
            final = offset + len(part) == len(tokens)
            for j, token in enumerate(part):
                batch.add(token, slot.n_past + j, slot.seq_id,
                          logits_last and final and j == len(part) - 1)
            ret = batch.decode(self.model.ctx)
            if ret != 0:
                raise DecodeError(f"llama_decode returned {ret}")
            slot.cached.extend(part)
            slot.n_past += len(part)

    def _step(self) -> None:
        """One decode for the next token of every generating slot, then sample each."""
        generating = [s for s in self.slots if s.job is not None and s.job.next_token >= 0]
        if not generating:
            return
        batch = self._batch
        batch.clear()
        for slot in generating:
            batch.add(slot.job.next_token, slot.n_past, slot.seq_id, True)  # type: ignore[union-attr]
        ret = batch.decode(self.model.ctx)
        if ret == 1:  # no room in the KV cache: drop idle slots' caches and retry once
            for slot in self.slots:
                if slot.job is None:
                    self._forget(slot)
            ret = batch.decode(self.model.ctx)
        if ret != 0:
            logger.error("llama_decode failed (%d) for %d sequences", ret, len(generating))
            for slot in generating:
                self._finish(slot, "length")
            return
        ctx = self.model.ctx
        sample = llama_cpp.llama_sampler_sample
        for i, slot in enumerate(generating):
            job = slot.job
            assert job is not None
            slot.cached.append(job.next_token)
            slot.n_past += 1
            self._on_token(slot, sample(job.sampler, ctx, i))

    def _on_token(self, slot: Slot, token: int) -> None:
        job = slot.job
        assert job is not None
        if not job.saw_first_token:
            job.saw_first_token = True
            job.request.timer.mark_since_start("first_token")
        if token in self.model.eog_tokens:
            self._finish(slot, "stop")
            return
        job.n_generated += 1
        text = job.text.push(self.model.pieces[token])
        if text:
            job.sink.put(TokenEvent(text))
        if job.text.stopped or job.request.cancelled.is_set():
            self._finish(slot, "stop")
        elif job.n_generated >= job.max_new or slot.n_past >= self.model.n_ctx:
            self._finish(slot, "length")
        else:
            job.next_token = token

    def _finish(self, slot: Slot, reason: str) -> None:
        job = slot.job
        assert job is not None
        tail = job.text.finish()
        if tail:
            job.sink.put(TokenEvent(tail))
        timer = job.request.timer
        timer.completion_tokens = job.n_generated
        timer.add("generation", time.perf_counter() - job.prompt_done_at)
        timer.mark_since_start("total")
        self._end(slot, DoneEvent(reason, timer))  # type: ignore[arg-type]

    def _end(self, slot: Slot, event: EngineEvent) -> None:
        job = slot.job
        assert job is not None
        llama_cpp.llama_sampler_free(job.sampler)
        slot.job = None
        job.sink.put(event)

    def _forget(self, slot: Slot) -> None:
        llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
        slot.cached.clear()
        slot.n_past = 0

    def _fail_queued(self, status: int, message: str) -> None:
        while True:
            try:
                _, sink, _ = self._inbox.get_nowait()
            except queue.Empty:
                return
            sink.put(ErrorEvent(status, message))

    def close(self) -> None:
        for slot in self.slots:
            if slot.job is not None:
                self._end(slot, ErrorEvent(503, "the server is shutting down"))
        self._batch.close()
