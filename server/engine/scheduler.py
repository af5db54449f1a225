"""Request queue → slots → one decode batch per step. Runs on the engine thread only.

Each step puts the next token of every generating slot, plus up to a batch's worth of
prompt tokens from slots that are still prefilling, into one llama_batch; decodes once;
samples each slot. A long prompt is thereby spread over several steps instead of stalling
the other streams. Images are encoded (or taken from the embedding cache) and written into
their slot's sequence between steps. When the shared KV cache cannot hold a step, the job
admitted last is preempted (server/engine/kv.py decides whom) and later resumed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

import llama_cpp

from server.config import Settings
from server.engine import mtmd, next_turn, step_costs
from server.engine.admission import (
    CLIENT_GONE,
    Inbox,
    Pending,
    QueueFullError,
    Sink,
    outranked,
)
from server.engine.batch import TokenBatch
from server.engine.drafts import count_drafted, take_draft
from server.engine.emit import finish, take_token
from server.engine.encoder import ImageEncoder
from server.engine.jobs import PrefillItem, Slot, end_job, slot_view
from server.engine.kv import KvBudget
from server.engine.model import LoadedModel
from server.engine.prompt_scores import score
from server.engine.sampling import GrammarError
from server.engine.start import Starter
from server.engine.step_batch import Prefilled, fill_step
from server.engine.types import (
    EngineEvent,
    ErrorEvent,
    GenerationRequest,
    ImageInput,
)
from server.engine.watchdog import Watchdog

logger = logging.getLogger("vlserve.engine")

__all__ = ["QueueFullError", "Scheduler", "Sink"]

PREENCODE_BACKLOG = 16  # uploaded images waiting for an idle engine to encode them
# A request this far into an answer that may run as long again moves the idle slots' KV to
# RAM (Starter.spill_idle): long answers get narrow attention, short ones no copy.
SPILL_AFTER_TOKENS = 64
# How long an idle engine waits for a request before copying idle slots to RAM (a request
# that comes meanwhile waits for one copy at most). A script's next turn, sent the moment
# an answer ends, comes sooner.
SAVE_AHEAD_QUIET_S = 0.05
IDLE_WAIT_S = 0.2  # the idle engine's longest wait: stop and cancellations are seen then
# How long a next-turn guess waits after its answer ends. The answer still has to reach its
# client (the event loop wakes, builds and writes the response), and a guess started at
# once takes every core for its decode: each response then left ~3 ms later on 2 cores. A
# next turn sent within the hold loses nothing: it would have stopped the guess anyway.
NEXT_TURN_HOLD_S = 0.02


class Scheduler:
    def __init__(self, model: LoadedModel, settings: Settings, watchdog: Watchdog) -> None:
        self.model = model
        self.watchdog = watchdog
        self.settings = settings
        self.slots = [Slot(seq_id=i) for i in range(settings.n_parallel)]
        self.encoder = ImageEncoder(model, settings.image_cache_mb * 1024 * 1024, watchdog)
        self._inbox = Inbox()
        # Once set (shutdown, engine failure), every request, queued or new, gets this event.
        self._refusal: ErrorEvent | None = None
        self._submit_lock = threading.Lock()
        # Bounded: the engine encodes ahead only when idle, so under steady load this would
        # grow by one decoded image per upload, for as long as the load lasts.
        self._preencode: deque[tuple[ImageInput, str]] = deque(maxlen=PREENCODE_BACKLOG)
        # Set by any step: once idle, idle slots are copied to RAM ahead of need.
        self._save_ahead = False
        self._copy_ahead = settings.prompt_cache_copy_ahead and settings.prompt_cache_ram_mb > 0
        self._batch = TokenBatch(max(model.n_batch, settings.n_parallel))
        self.kv = KvBudget(model.n_ctx)
        self._starter = Starter(model, settings, self.kv)
        self._mem = self._starter.mem
        self.ram_cache = self._starter.ram
        self.preemptions = 0  # read by /metrics from another thread (an int: no lock)
        self._next_turn = model.next_turn_markup if settings.next_turn_prefill else ()
        self._tail = next_turn.TailTokenizer(model.template, model.splitter, model.vocab,
                                             settings.system_prompt)
        self.next_turn_tokens = 0  # evaluated ahead of a next turn (the same)

    # --- any thread -------------------------------------------------------------------
    def submit(self, request: GenerationRequest, prompt: mtmd.TokenizedPrompt, sink: Sink,
               siblings: list[tuple[GenerationRequest, Sink]] | None = None) -> None:
        """Queue a prepared request (with `siblings`: the other choices of an `n > 1`
        request, admitted together); from here on the engine owns (and frees) `prompt`."""
        pending = Pending(request, prompt, sink, siblings=siblings or [])
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
        return (tenant, cache_id, 0) in self.encoder.embeddings

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
        return [slot_view(slot) for slot in self.slots]

    @property
    def kv_cells_running(self) -> int:
        """KV cells held by running requests (read from other threads: racy by a step)."""
        return self.kv.running_cells(list(self.slots))

    @property
    def kv_cells_used(self) -> int:
        """KV positions held by all sequences, idle slots' reusable prefixes included."""
        return sum(s.n_past for s in self.slots)

    # --- engine thread ----------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            for pending in self._inbox.take_cancelled():
                pending.drop_cancelled()
            hold = self._next_turn_hold()  # > 0: an answer is still on its way out
            guess_now = hold == 0.0
            # Idle work waits out a hold too; meanwhile the engine only admits requests.
            idle_work = guess_now or (hold is None and bool(self._preencode))
            wait = hold or (SAVE_AHEAD_QUIET_S if self._save_ahead else IDLE_WAIT_S)
            self._admit(block=not self.busy_slots and not idle_work, wait=wait)
            if self.busy_slots:
                # The slots it leaves idle are worth a copy.
                self._save_ahead = self._copy_ahead
                self._step()
            elif hold:  # nothing else takes the cores yet
                continue
            elif guess_now:  # idle work, like encoding ahead: requests always go first
                self._prefill_next_turns()
            elif self._preencode:
                self.encoder.encode_ahead(*self._preencode.popleft())
            elif self._save_ahead:  # quiet for SAVE_AHEAD_QUIET_S
                self._save_idle_ahead()
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

    def abandon_all(self, event: ErrorEvent) -> None:
        """Answer every request, running or queued, with `event` from another thread while
        the engine thread is stuck: nothing is freed (the stuck call may be using it; the
        process is about to exit), only the handlers are told."""
        with self._submit_lock:
            self._refusal = event
        for slot in list(self.slots):
            job = slot.job
            if job is not None:
                job.sink.put(event)
        for pending in self._inbox.take_all():
            for sink in pending.sinks():
                sink.put(event)

    def run_to_completion(self, request: GenerationRequest, prompt: mtmd.TokenizedPrompt,
                          sink: Sink) -> None:
        """Serve one request synchronously (warm-up, before the loop starts)."""
        self.submit(request, prompt, sink)
        self._admit(block=False)
        while self.busy_slots:
            self._step()
        for slot in self.slots:
            slot.next_turn = None  # nobody continues the warm-up

    def measure_step_costs(self) -> None:
        """Time decode steps of 1 up to the most positions predicted drafts can make a step
        (at warm-up: before traffic, after the warm-up request's allocations), on slot 0's
        sequence past its content, taken back out after each."""
        slot = self.slots[0]
        largest = min(len(self.slots) + self.settings.prediction_max_draft, self._batch.capacity,
                      self.kv.free(self.slots), self.model.n_ctx - slot.n_past)
        if not self.settings.prediction_max_draft or self.settings.prediction_position_cost \
                or largest < 2:
            return  # no drafts, costs as configured, or no room to measure
        try:
            with self.watchdog.watch("a decode step"):
                costs = step_costs.measure(self.model.ctx, self._batch, slot.seq_id,
                                           slot.n_past, largest, token=0)
        except RuntimeError as exc:  # drafts are then paced by the assumed costs
            logger.warning("decode step costs not measured: %s", exc)
            return
        self._starter.step_costs = costs
        logger.info("decode step time by positions (for predicted drafts): %s", ", ".join(
            f"{n}: {s * 1000:.1f} ms" for n, s in zip(costs.sizes, costs.seconds, strict=True)))

    def share_prefix_of_slot(self, source: int = 0) -> None:
        """Let every slot start from `source`'s KV (e.g. the warmed-up system prompt);
        with a unified KV cache the cells are shared, not copied."""
        origin = self.slots[source]
        for slot in self.slots:
            if slot is not origin and slot.job is None:
                self._starter.copy_sequence(origin, slot)

    def _admit(self, block: bool, wait: float = IDLE_WAIT_S) -> None:
        """Start what waits and fits; with `block`, wait up to `wait` s for a request."""
        if not block and not len(self._inbox):
            return  # the usual step: nothing waits (a request put meanwhile waits one step)
        # A waiting request that outranks running work (a chat while batch lines hold the
        # slots or the KV cache) takes its place now; the preempted line resumes later.
        while (slot := outranked(self.slots, self._inbox.head(), self._fits)) is not None:
            self._preempt(slot, "a higher-priority request is waiting")
        while any(s.job is None for s in self.slots):
            pending = self._inbox.get(timeout=wait if block else 0, accept=self._fits)
            if pending is None:
                return
            block = False
            pending.request.timer.add("queue", time.perf_counter() - pending.queued_at)
            if pending.request.cancelled.is_set():
                pending.drop_cancelled()
            else:
                self._start_guarded(pending)

    def _fits(self, pending: Pending) -> bool:
        """The queue's head waits while it would not fit beside the running jobs (an
        `n > 1` request: until it has a free slot per choice); a preempted job resumes only
        then (admitting it sooner would preempt it again)."""
        if pending.job:
            return self.kv.admits(self.slots, pending.job.cells_needed())
        if sum(1 for s in self.slots if s.job is None) < pending.n_slots:
            return False
        # Shared cells are counted once per sequence (see kv.py), so per choice here too.
        return self.kv.admits(self.slots, (pending.prompt.n_tokens + 1) * pending.n_slots)

    def _start_guarded(self, pending: Pending) -> None:
        """One request's unexpected failure answers that request with a 500; it must never
        take the engine loop (and every other request) down with it."""
        try:
            job = pending.job or self._starter.new_job(pending)
            if job is not None:
                self._starter.place(job, self.slots)
                if pending.job is None:
                    self._starter.seat_siblings(job, self.slots)
        except Exception:
            logger.exception("preparing request %s failed", pending.request.request_id)
            for slot in self.slots:
                if slot.job is not None and slot.job.request is pending.request:
                    self._forget(slot)
                    self._end(slot, ErrorEvent(500, "the engine failed on this request"))
                    return
            pending.answer(ErrorEvent(500, "the engine failed on this request"))

    def _preempt(self, slot: Slot, why: str = "KV cache full") -> None:
        """Free the slot's KV and requeue its job first in line, keeping its sampler (grammar
        state), its text stream and the tokens it generated; it resumes by re-evaluating
        prompt and tokens, so its stream goes on with nothing lost or repeated."""
        job = slot.job
        assert job is not None
        self._forget(slot)
        slot.job = None
        job.preemptions += 1
        job.request.timer.preemptions += 1
        self.preemptions += 1
        logger.info("request %s preempted after %d tokens (%s, %d cells); it resumes "
                    "when there is room", job.request.request_id, job.n_generated, why,
                    self.kv.n_ctx)
        self._inbox.put_front(Pending(job.request, job.prompt, job.sink, job=job))

    def _make_room(self, need: Callable[[], int]) -> bool:
        """Free cells until `need()` of them are (by the estimate) free: idle slots' prefix
        caches go first, then the job admitted last. False when nothing more can go."""
        while self.kv.free(self.slots) < need():
            if any(s.job is None and s.n_past for s in self.slots):
                self._starter.drop_idle(self.slots)  # to RAM first, when that is on
                continue
            victim = self.kv.victim(self.slots)
            if victim is None:
                return False
            self._preempt(victim)
        return True

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
                self._eval_image(slot, job.work[0])

        self._make_room(lambda: self.kv.step_need(self.slots))
        while True:
            t0 = time.perf_counter()
            generating, prefilled = self._fill_batch()
            if self._batch.n == 0:
                return
            with self.watchdog.watch("a decode step"):
                ret = self._batch.decode(self.model.ctx)
            if ret == 0:
                break
            # 1: llama.cpp found no room after all (the estimate is only that); nothing was
            # decoded, so free room the same way and build the step again.
            short = self.kv.free(self.slots) + 1
            if ret != 1 or not self._make_room(lambda short=short: short):
                self._decode_failed(ret, generating, prefilled)
                return
        decode_s = time.perf_counter() - t0
        ctx = self.model.ctx
        spill = False
        for i, slot in enumerate(generating):
            job = slot.job
            assert job is not None
            slot.cached.append(job.next_token)
            slot.n_past += 1
            before = job.n_generated
            if job.draft:
                count_drafted(job)
            self._sample(slot, ctx, i)
            if job.draft:
                take_draft(slot, job, lambda index, slot=slot: self._sample(slot, ctx, index),
                           self._mem)
            spill = spill or (before < SPILL_AFTER_TOKENS <= job.n_generated
                              and job.max_new >= 2 * SPILL_AFTER_TOKENS)
        if spill:
            self._starter.spill_idle(self.slots)
        for part in prefilled:
            self._prefill_done(part, decode_s)

    def _fill_batch(self) -> tuple[list[Slot], list[Prefilled]]:
        return fill_step(self._batch, self.slots, self.kv.free(self.slots),
                         self.settings.prediction_max_slowdown)

    def _prefill_done(self, part: Prefilled, decode_s: float) -> None:
        slot, item = part.slot, part.item
        job = slot.job
        if job is None:
            return
        if job.prompt_logprobs is not None:
            score(job, item, part.first_index, part.n, self.model)
        slot.cached.extend(item.chunk.tokens[item.start:item.start + part.n])
        slot.n_past += part.n
        item.start += part.n
        job.request.timer.add("prompt_eval", decode_s)
        if item.start == len(item.chunk.tokens):
            job.work.popleft()
        if part.last_index >= 0:
            if not job.prompt_done_at:  # a resumed job's generation clock keeps running
                job.prompt_done_at = time.perf_counter()
            # Siblings first: sampling reads the logits, and the copies start from them too.
            copies = self._starter.start_siblings(job, slot, self.slots)
            if copies:
                logger.info("request %s: prompt evaluated once for %d choices (slot %d's KV "
                            "copied to %s)", job.request.request_id, len(copies) + 1,
                            slot.seq_id, ", ".join(str(s.seq_id) for s in copies))
            if job.max_new == 0:  # prompt scoring (echo, max_tokens 0): nothing to generate
                for target in [*copies, slot]:
                    finish(target, "length", self.model, self._next_turn, last=None)
                return
            for target in copies:
                self._sample(target, self.model.ctx, part.last_index)
            self._sample(slot, self.model.ctx, part.last_index)

    def _eval_image(self, slot: Slot, item: PrefillItem) -> None:
        job = slot.job
        assert job is not None and item.chunk.image is not None and item.embed_key is not None
        cells = item.chunk.n_tokens  # an M-RoPE image takes more cells than positions
        if not self._make_room(lambda: cells if slot.job is job else 0) or slot.job is not job:
            return  # preempted (it was the newest job): it evaluates the image on resume
        job.work.popleft()
        timer = job.request.timer
        model = self.model
        try:
            # A resumed job's image was counted (hit or miss) when it was first evaluated.
            embd = self.encoder.embedding(item.chunk, item.embed_key, timer,
                                          count_hit=not job.preemptions)
            t1 = time.perf_counter()
            with self.watchdog.watch("an image decode"):
                slot.n_past = mtmd.decode_image(model.mtmd, model.ctx, item.chunk, embd,
                                                slot.n_past, slot.seq_id, model.n_batch)
            slot.cached.append(item.chunk.image)
            timer.add("prompt_eval", time.perf_counter() - t1)
        except mtmd.MediaError as exc:
            logger.error("image failed in request %s: %s", job.request.request_id, exc)
            self._forget(slot)
            self._end(slot, ErrorEvent(500, str(exc), code="image_failed"))

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
        take_token(slot, token, batch_index, self.model, self._next_turn)

    def _decode_failed(self, ret: int, generating: list[Slot], prefilled: list[Prefilled]
                       ) -> None:
        """Nothing left to preempt, or llama.cpp failed otherwise: the step's requests end
        with an error, never with a `length` that their client would take for their own."""
        logger.error("llama_decode failed (%d) with %d generating, %d prefilling sequences",
                     ret, len(generating), len(prefilled))
        event = ErrorEvent(503, "the KV cache is full; retry shortly", code="kv_cache_full") \
            if ret == 1 else ErrorEvent(500, f"llama_decode failed ({ret})",
                                        code="decode_failed")
        for slot in [*generating, *(part.slot for part in prefilled)]:
            if slot.job is not None:
                self._forget(slot)
                self._end(slot, event)

    def _end(self, slot: Slot, event: EngineEvent) -> None:
        """End the slot's job; siblings still waiting for its prompt end with it (nothing
        else would ever start them)."""
        job = slot.job
        waiting = [s for s in job.siblings if s.awaits_copy] if job else []
        end_job(slot, event)
        for sibling in waiting:
            seat = next((s for s in self.slots if s.job is sibling), None)
            if seat is not None:
                end_job(seat, event)
            else:  # built but never seated (its leader failed while being placed)
                sibling.sampler.free()
                sibling.prompt.close()
                sibling.sink.put(event)

    def _save_idle_ahead(self) -> None:
        """Copy the idle slots to RAM one after another; a request that comes meanwhile
        goes first (it waits for one copy at most), and the rest wait for the next quiet
        moment. All at once, not one per quiet moment: a client's next request often comes
        within a few of them, and every slot not copied by then stays in its way."""
        while True:
            with self.watchdog.watch("a copy to RAM"):
                copied = self._starter.save_idle_ahead(self.slots)
            if not copied:
                break
            if len(self._inbox):
                return
        self._save_ahead = False

    def _next_turn_hold(self) -> float | None:
        """Seconds until the idle slots' next-turn guesses may start (0: now); None: no
        guess waits."""
        ended = [s.idle_since for s in self.slots if s.next_turn is not None]
        if not ended:
            return None
        return max(0.0, max(ended) + NEXT_TURN_HOLD_S - time.monotonic())

    def _prefill_next_turns(self) -> None:
        with self.watchdog.watch("a decode step"):
            n = next_turn.prefill(self.slots, self._batch, self.model.ctx,
                                  self.kv.free(self.slots), self.model.n_ctx,
                                  interrupted=lambda: len(self._inbox) > 0,
                                  markup=self._next_turn, tail=self._tail)
        self.next_turn_tokens += n

    def _forget(self, slot: Slot) -> None:
        self._starter.forget(slot)

    def close(self) -> None:
        for slot in self.slots:
            if slot.job is not None:
                self._end(slot, ErrorEvent(503, "the server is shutting down",
                                           code="server_shutting_down"))
        self._batch.close()

