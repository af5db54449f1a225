"""KV capacity accounting: whether work fits the shared KV cache, and whom to preempt.

All slots share one pool of n_ctx cells (kv_unified). Counting is by cells per slot (an
M-RoPE image takes more cells than positions); cells that sequences share (a prefix copied
from the warm-up slot) are counted once per slot: the estimate errs on the full side, which
can only preempt early, never overfill. llama_decode's own "no room" answer (1) remains
the final word; the scheduler then frees room the same way and retries.
"""

from __future__ import annotations

from collections.abc import Iterable

from server.engine.jobs import Job, Slot
from server.engine.prefix import n_cells


class KvBudget:
    def __init__(self, n_ctx: int) -> None:
        self.n_ctx = n_ctx

    def clip(self, max_tokens: int, prompt_cells: int) -> int:
        """A request that could not finish even alone stops where the context ends
        (finish_reason `length` there), instead of failing partway; 0 (a prompt scored,
        nothing generated) stays 0."""
        return max(min(max_tokens, 1), min(max_tokens, self.n_ctx - prompt_cells))

    def free(self, slots: Iterable[Slot]) -> int:
        """Cells no sequence holds, idle slots' reusable prefixes counted as held."""
        return self.n_ctx - sum(n_cells(s.cached) for s in slots)

    def admits(self, slots: Iterable[Slot], job_need: int) -> bool:
        """Whether a job needing `job_need` cells fits beside the running ones (idle
        caches can be dropped for it). With nothing running, anything admitted fits: its
        max_tokens was clipped to the context."""
        active = [s for s in slots if s.job is not None]
        return not active or self.running_cells(active) + job_need <= self.n_ctx

    @staticmethod
    def running_cells(slots: Iterable[Slot]) -> int:
        """Cells that running requests hold. Idle slots' reusable prefixes are left out: they
        are dropped the moment a request needs room, so they are not load."""
        return sum(n_cells(s.cached) for s in slots if s.job is not None)

    @staticmethod
    def step_need(slots: Iterable[Slot]) -> int:
        """Cells the next step needs at least: one per generating slot, and one for prompt
        text if some slot has text to prefill (more is taken only if free)."""
        jobs = [s.job for s in slots if s.job is not None]
        generating = sum(1 for j in jobs if j.next_token >= 0)
        prefilling = any(j.work and j.work[0].chunk.image is None for j in jobs)
        return generating + int(prefilling)

    @staticmethod
    def victim(slots: Iterable[Slot]) -> Slot | None:
        """The running job of the lowest priority (batch lines before interactive requests)
        admitted last; None when no more than one runs: the oldest is never preempted for
        the others' sake, so it always makes progress."""
        active = [s for s in slots if s.job is not None]
        if len(active) < 2:
            return None
        return max(active, key=lambda s: _rank(s.job))


def _rank(job: Job | None) -> tuple[int, int]:
    assert job is not None
    return -job.request.priority, job.order
