"""Putting a request in a slot: build its job (or take back a preempted one), keep the
slot's reusable KV prefix, and queue the rest as prefill work. Engine thread only."""

from __future__ import annotations

import itertools
import logging
import time

import llama_cpp

from server.config import Settings
from server.engine import lookup, mtmd, step_costs
from server.engine.admission import Pending, Sink
from server.engine.detokenize import TextStream
from server.engine.jobs import DraftSource, Job, Slot, remaining_work, resume_chunks
from server.engine.kv import KvBudget
from server.engine.lookup import ContextLookup
from server.engine.model import LoadedModel
from server.engine.prediction import DraftPace
from server.engine.prefix import (
    KvEntries,
    KvKey,
    common_prefix_len,
    longest_match,
    n_positions,
    n_tokens,
)
from server.engine.prompt_scores import new_scores
from server.engine.ram_cache import RamPrefixCache
from server.engine.sampling import GrammarError, build_sampler
from server.engine.types import ErrorEvent, GenerationRequest

logger = logging.getLogger("vlserve.engine")

# Without a warm-up's measurement: each more position in a step costs half a step (about
# what 9 positions cost on 2 CPU cores with Gemma 3 270M).
ASSUMED_POSITION_COST = 0.5


class Starter:
    def __init__(self, model: LoadedModel, settings: Settings, kv: KvBudget) -> None:
        self.model = model
        self.settings = settings
        self.kv = kv
        self.mem = llama_cpp.llama_get_memory(model.ctx)
        budget = settings.prompt_cache_ram_mb * 1024 * 1024
        self.ram = RamPrefixCache(model.ctx, budget) if budget else None
        self._order = itertools.count()
        # What longer decode steps cost, for predicted drafts: as configured, else measured
        # at warm-up (Scheduler.measure_step_costs) and assumed until then (or without one).
        self.step_costs = step_costs.linear(
            settings.prediction_position_cost or ASSUMED_POSITION_COST,
            settings.n_parallel + settings.prediction_max_draft)

    def new_job(self, pending: Pending) -> Job | None:
        """The job for a newly admitted request (with its `n > 1` siblings, which share its
        prompt), or None once it is answered (bad grammar)."""
        try:
            job = self._job(pending.request, pending.sink, pending.prompt)
            # The siblings' grammar is the same text: if the first parsed, theirs do.
            job.siblings = [self._job(request, sink, pending.prompt.share())
                            for request, sink in pending.siblings]
        except GrammarError as exc:
            pending.answer(ErrorEvent(400, f"response_format: {exc}", code="invalid_grammar"))
            return None
        for sibling in job.siblings:
            sibling.awaits_copy = True
        return job

    def _job(self, request: GenerationRequest, sink: Sink, prompt: mtmd.TokenizedPrompt
             ) -> Job:
        model = self.model
        sampler = build_sampler(request.sampling, model.vocab, model.utf8, model.eog_tokens,
                                request.timer)
        drafts_from, pace = self._drafts(request)
        max_new = self.kv.clip(request.max_tokens, prompt.n_tokens)
        if max_new < request.max_tokens:
            logger.info("request %s: max_tokens %d clipped to %d, all the context leaves "
                        "after its %d prompt cells", request.request_id,
                        request.max_tokens, max_new, prompt.n_tokens)
        return Job(
            request=request,
            sink=sink,
            sampler=sampler,
            # The template's next-turn markers end the answer too, except for benchmarks
            # that ask to run to max_tokens whatever the model writes.
            text=TextStream(request.stop + (() if request.sampling.ignore_eos
                                            or request.raw
                                            else model.stop_strings)),
            max_new=max_new,
            prompt=prompt,
            work=remaining_work(prompt.chunks, 0, request.tenant),
            deadline=time.perf_counter() + (request.timeout_s or self.settings.request_timeout),
            order=next(self._order),
            held_text=None if request.stream or request.top_logprobs is not None else [],
            prompt_logprobs=new_scores(request, prompt, model),
            drafts_from=drafts_from,
            pace=pace,
        )

    def _drafts(self, request: GenerationRequest) -> tuple[DraftSource | None, DraftPace | None]:
        """Where a job's drafts come from, and their pace: the client's prediction, else
        the request's own text (prompt lookup); none where drafting is off."""
        most = self.settings.prediction_max_draft
        if most and request.predicted is not None:
            return request.predicted, DraftPace(most, self.step_costs)
        if most and request.looked_up is not None:
            return ContextLookup(request.looked_up), DraftPace.watched(
                most, self.step_costs, lookup.PRIOR_KEPT, lookup.MARGIN)
        return None, None

    def place(self, job: Job, slots: list[Slot]) -> None:
        """Seat `job` in the free slot that already holds most of what it needs; the rest
        (prompt, then for a resumed job what it generated) becomes its prefill work."""
        request = job.request
        keys = job.keys()
        for idle in slots:  # guesses of a next turn wait for an idle engine; that is over
            idle.next_turn = None
        # A scored prompt may reuse only what it scored itself: it picks, borrows and
        # restores by that alone, so it takes the slot whose cache it spoils least.
        reusable = keys if job.prompt_logprobs is None else keys[:job.prompt_logprobs.upto]
        slot, keep = self._pick_slot(slots, reusable, request.tenant, n_tokens(keys))
        if self.ram is not None and self.ram.worth_saving(slot, keep):
            self.ram.save(slot)  # what this request is about to replace
        keep = self._borrow_prefix(slot, slots, reusable, request.tenant, keep)
        # Before a restore, which then finds the cells they held free (a borrowed prefix
        # shares its donor's cells, so the donor may go).
        self._drop_copied_idle(slots, but=slot)
        keep = self._restore_prefix(slot, reusable, request.tenant, keep)
        kept = keys[:keep]
        slot.n_past = n_positions(kept)
        llama_cpp.llama_memory_seq_rm(self.mem, slot.seq_id, slot.n_past, -1)
        slot.cached.truncate(keep)
        slot.tenant = request.tenant
        if not job.preemptions:
            request.timer.cached_tokens = n_tokens(kept)
            # Images already in the slot's KV are reused without the encoder, like hits.
            request.timer.image_cache_hits += sum(1 for k in kept if not isinstance(k, int))
        job.work = remaining_work(resume_chunks(job), keep, request.tenant)
        job.next_token = -1  # a resumed job's pending token is the last one re-evaluated
        job.awaits_copy = False  # a sibling resumed after a preemption evaluates for itself
        slot.job = job

    def seat_siblings(self, job: Job, slots: list[Slot]) -> None:
        """Seat `job`'s siblings in free slots (emptiest first; their caches are replaced by
        the copy anyway), with no work of their own until start_siblings."""
        for sibling in job.siblings:
            slot = min((s for s in slots if s.job is None), key=lambda s: len(s.cached))
            self.forget(slot)
            slot.tenant = sibling.request.tenant
            sibling.work.clear()
            slot.job = sibling

    def start_siblings(self, job: Job, slot: Slot, slots: list[Slot]) -> list[Slot]:
        """Give the siblings still waiting a copy of `slot`'s sequence (`job`'s prompt, just
        evaluated); their slots, to sample from the same logits."""
        started: list[Slot] = []
        for sibling in job.siblings:
            target = next((s for s in slots if s.job is sibling), None)
            if target is None or not sibling.awaits_copy:
                continue  # ended, or preempted: it evaluates the prompt itself on resume
            self.copy_sequence(slot, target)
            sibling.awaits_copy = False
            sibling.prompt_done_at = job.prompt_done_at
            started.append(target)
        job.siblings = []
        return started

    def _borrow_prefix(self, slot: Slot, slots: list[Slot], keys: list[KvKey], tenant: str,
                       keep: int) -> int:
        """How much of `keys` `slot` holds once a longer prefix that another slot of the
        same tenant holds (running or idle) is copied in: questions about one image asked
        at once (a batch, several users) then evaluate the image once, not once per slot."""
        donor, longest = longest_match(((other, other.cached) for other in slots
                                        if other is not slot and other.tenant == tenant),
                                       keys, keep)
        if donor is None:
            return keep
        self.copy_sequence(donor, slot, longest)
        logger.debug("slot %d: %d KV entries copied from slot %d", slot.seq_id, longest,
                     donor.seq_id)
        return longest

    def _restore_prefix(self, slot: Slot, keys: list[KvKey], tenant: str, keep: int) -> int:
        """A longer prefix saved in RAM is put back into `slot` instead of evaluated."""
        if self.ram is None:
            return keep
        saved, longest = self.ram.best(keys, tenant)
        if saved is None or longest <= keep:
            return keep
        if not self.ram.restore(saved, slot):
            return 0
        logger.debug("slot %d: %d KV entries restored from RAM", slot.seq_id, longest)
        return longest

    def save_idle_ahead(self, slots: list[Slot]) -> bool:
        """Copy one idle slot's sequence to RAM while the engine idles, so that the next
        request can start with it out of the KV cache at no cost (see place). Whether one
        was copied (there may be more)."""
        if self.ram is None:
            return False
        idle = [s for s in slots if s.job is None and s.next_turn is None and s.cached]
        # The most recently used first: with the budget short, it is the one to keep.
        for other in sorted(idle, key=lambda s: s.idle_since, reverse=True):
            if not self.ram.holds(other) and self.ram.save_ahead(other):
                return True
        return False

    def _drop_copied_idle(self, slots: list[Slot], but: Slot) -> None:
        """Idle slots whose sequence RAM holds leave the KV cache before a new prompt is
        evaluated (llama-server clears idle slots at every request too): the prompt's cells
        then come first in the cache and every step attends over the running sequences'
        cells only, from the first token; copying them out later (spill_idle) would stall
        every stream. A conversation that comes back is copied in again (~0.03 ms a
        token on the bench model) instead of found in place."""
        if self.ram is None:
            return
        for other in slots:
            if other.job is None and other is not but and other.cached \
                    and self.ram.holds(other):
                self.forget(other)

    def spill_idle(self, slots: list[Slot]) -> None:
        """The idle slots' sequences go to RAM and out of the KV cache: the running
        requests then attend over their own cells only. For idle slots the engine had no
        quiet moment to copy ahead (save_idle_ahead; a busy server): called once a request
        has shown it is long (SPILL_AFTER_TOKENS), not when it starts, as the copy stalls
        every stream for ~0.03 ms per idle token (bench model), which a short answer never
        earns back."""
        if self.ram is not None:
            self.drop_idle(slots)

    def drop_idle(self, slots: list[Slot], but: Slot | None = None) -> None:
        """Idle slots' sequences (`but`'s aside) leave the KV cache, kept in RAM when the
        RAM cache is on: room for a prompt or a step, or narrower attention."""
        for other in slots:
            if other.job is None and other is not but and (other.cached or other.n_past):
                if self.ram is not None:
                    self.ram.save(other)
                self.forget(other)

    def copy_sequence(self, source: Slot, target: Slot, keep: int | None = None) -> None:
        """`target` holds what `source` holds (its first `keep` entries); with a unified KV
        cache the cells are shared, not copied."""
        entries = source.cached if keep is None else source.cached[:keep]
        n_past = source.n_past if keep is None else n_positions(entries)
        llama_cpp.llama_memory_seq_rm(self.mem, target.seq_id, -1, -1)
        llama_cpp.llama_memory_seq_cp(self.mem, source.seq_id, target.seq_id, 0, n_past)
        target.next_turn = None
        target.cached = KvEntries(entries)
        target.n_past = n_past
        target.tenant = source.tenant

    def _pick_slot(self, slots: list[Slot], keys: list[KvKey], tenant: str, cells: int
                   ) -> tuple[Slot, int]:
        """best_slot among the free ones; idle caches are dropped if the prompt (`cells`
        KV cells) might not fit beside them."""
        best, keep = best_slot([s for s in slots if s.job is None], keys, tenant)
        # KV cells, not positions: an M-RoPE image (GLM-4V, Qwen) takes a cell per token but
        # fewer positions (a large `detail: high` image: 782 cells at 46 positions).
        if self.kv.free(s for s in slots if s is not best) < cells:
            self.drop_idle(slots, but=best)
        return best, keep

    def forget(self, slot: Slot) -> None:
        llama_cpp.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)
        slot.next_turn = None
        slot.cached.clear()
        slot.n_past = 0


def best_slot(free: list[Slot], keys: list[KvKey], tenant: str) -> tuple[Slot, int]:
    """The free slot where the prompt gains most (entries kept minus cached entries thrown
    away), and how many entries to keep. So a new conversation that shares only the
    template's first tokens with another's cache takes an empty slot instead of wiping that
    conversation, whose next turn would otherwise re-read everything. Another tenant's
    cache is worth nothing: how much of it matched would tell what it holds."""

    def keeps(slot: Slot) -> int:
        return common_prefix_len(slot.cached, keys) if slot.tenant == tenant else 0

    # Ties go to the shorter cache, then to the lower slot.
    best = max(free, key=lambda s: (2 * keeps(s) - len(s.cached), -len(s.cached), -s.seq_id))
    return best, keeps(best)
