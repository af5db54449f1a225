"""Per-request stage clock: each stage is written once, read once at the end."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

# Stages that run one after another; their sum approximates `total`.
SEQUENTIAL_STAGES = (
    "queue",
    "image_decode",
    "image_resize",
    "image_encode",
    "prompt_eval",
    "generation",
)
# `first_token` is the time from arrival to the first generated token (TTFT), so it
# overlaps the stages before it; `total` is arrival to the end of the response; `grammar`
# (checking tokens against a response format's grammar) lies inside `generation`.
STAGES = (*SEQUENTIAL_STAGES, "first_token", "total", "grammar")


@dataclass
class StageTimer:
    """Accumulates stage durations (ms) and token counts for one request."""

    started: float = field(default_factory=time.perf_counter)
    stages_ms: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    prompt_tokens: int = 0
    image_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    images: int = 0  # images in the request, counted as they are decoded
    image_cache_hits: int = 0  # images whose embedding was reused instead of encoded
    grammar_resamples: int = 0  # tokens drawn again because the grammar refused the first
    preemptions: int = 0  # times the KV cache was full and this request stepped aside
    reasoning_tokens: int = 0  # of completion_tokens, a thinking model's (server/api/reasoning)
    # Predicted Outputs (server/engine/prediction.py): draft tokens the answer kept, and
    # those it did not (each was still evaluated).
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0
    # The same for drafts from the request's own text (server/engine/lookup.py): not the
    # client's prediction, so not in usage.
    accepted_lookup_tokens: int = 0
    rejected_lookup_tokens: int = 0

    def add(self, stage: str, seconds: float) -> None:
        self.stages_ms[stage] += seconds * 1000.0

    def mark_since_start(self, stage: str) -> None:
        """Set a stage to the time elapsed since the request arrived."""
        self.stages_ms[stage] = (time.perf_counter() - self.started) * 1000.0

    @property
    def tokens_per_second(self) -> float:
        generation_s = self.stages_ms["generation"] / 1000.0
        if self.completion_tokens == 0 or generation_s <= 0:
            return 0.0
        return self.completion_tokens / generation_s

    def as_dict(self) -> dict[str, float | int]:
        out: dict[str, float | int] = {k: round(v, 3) for k, v in self.stages_ms.items()}
        out.update(
            prompt_tokens=self.prompt_tokens,
            image_tokens=self.image_tokens,
            cached_tokens=self.cached_tokens,
            completion_tokens=self.completion_tokens,
            image_cache_hits=self.image_cache_hits,
            grammar_resamples=self.grammar_resamples,
            preemptions=self.preemptions,
            reasoning_tokens=self.reasoning_tokens,
            accepted_prediction_tokens=self.accepted_prediction_tokens,
            rejected_prediction_tokens=self.rejected_prediction_tokens,
            accepted_lookup_tokens=self.accepted_lookup_tokens,
            rejected_lookup_tokens=self.rejected_lookup_tokens,
            tokens_per_second=round(self.tokens_per_second, 2),
        )
        return out

    def server_timing_header(self) -> str:
        """The W3C Server-Timing header value: `stage;dur=ms` for each stage."""
        return ", ".join(f"{k};dur={v:.2f}" for k, v in self.stages_ms.items())
