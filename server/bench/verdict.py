"""The bottleneck verdict: a small rule set over the bench's per-stage numbers.

A share is the median, over a scenario's successful requests, of each request's ratio
(e.g. image_encode / first_token): the typical request, not skewed by one slow outlier.
"TTFT" is the server's `first_token`, arrival → first generated token; times quoted in
the messages are medians.
Each rule that fires gives a finding. The bottleneck is the severity-2 finding with the
largest share; when none fires, the verdict names the largest stage instead. The other
findings follow, ranked by severity, then share (failed requests first).

rule          scenario          fires when                                       severity
errors        any               a request failed                                 3
image_encode  image             image_encode ≥ 50 % of TTFT                      2
image_prep    image             image_decode + image_resize ≥ 25 % of TTFT       2
prompt_eval   image             prompt_eval ≥ 50 % of TTFT                       2
              text              prompt_eval ≥ 50 % of total (a text-only request's
                                TTFT is all prompt_eval, so its share of TTFT says
                                nothing)
generation    image (or text)   generation ≥ 60 % of total                       2
queue         highest c ≥ 2     queue ≥ 30 % of total                            2
transfer      image             client TTFT − server TTFT ≥ 30 % of client TTFT  2
                                and ≥ 20 ms (sending and parsing the request)
scaling       c=1 → highest c   requests/s grows less than 1.3×                  1
image_cost    text vs image     always: what an image adds to TTFT               0

The advice in each message depends on where the server says the work runs (GET /models
`meta`: `projector_on_gpu`, `gpu_layers`, `n_layers`, `n_parallel`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from server.bench.results import ScenarioResult, ServerInfo, percentile
from server.timings import SEQUENTIAL_STAGES

IMAGE_ENCODE_SHARE = 0.5
IMAGE_PREP_SHARE = 0.25
PROMPT_EVAL_SHARE = 0.5
GENERATION_SHARE = 0.6
QUEUE_SHARE = 0.3
TRANSFER_SHARE = 0.3
TRANSFER_MIN_MS = 20.0
SCALING_MIN = 1.3

CRITICAL, BOTTLENECK, ADVICE, INFO = 3, 2, 1, 0


@dataclass(frozen=True)
class Finding:
    rule: str
    severity: int
    share: float  # the ratio that fired the rule (0 when not a ratio)
    message: str


@dataclass(frozen=True)
class Verdict:
    bottleneck: Finding
    findings: list[Finding]  # the others, most severe first

    def to_dict(self) -> dict[str, Any]:
        return {"bottleneck": asdict(self.bottleneck),
                "findings": [asdict(f) for f in self.findings]}


class _Run:
    """The scenarios by role, plus the server's meta, for the rules to read."""

    def __init__(self, scenarios: list[ScenarioResult], server: ServerInfo) -> None:
        self.all = scenarios
        self.meta = server.meta
        self.text = _first(s for s in scenarios if s.name == "text" and s.ok)
        self.image = _first(s for s in scenarios if s.name == "image" and s.ok)
        levels = sorted((s for s in scenarios if s.name.startswith("c=") and s.ok),
                        key=lambda s: s.concurrency)
        self.highest = levels[-1] if levels and levels[-1].concurrency >= 2 else None
        self.lowest = levels[0] if levels else None


def judge(scenarios: list[ScenarioResult], server: ServerInfo) -> Verdict:
    run = _Run(scenarios, server)
    findings = [f for rule in RULES if (f := rule(run)) is not None]
    findings.sort(key=lambda f: (-f.severity, -f.share))
    stages = [f for f in findings if f.severity == BOTTLENECK]
    bottleneck = stages[0] if stages else _largest_stage(run)
    return Verdict(bottleneck, [f for f in findings if f is not bottleneck])


def _errors(run: _Run) -> Finding | None:
    total = sum(len(s.samples) for s in run.all)
    failed = [(s.name, x) for s in run.all for x in s.samples if not x.ok]
    if not failed:
        return None
    name, first = failed[0]
    status = f"HTTP {first.status}" if first.status else "no response"
    advice = {429: ": the queue is full, raise max_queue or lower the concurrency",
              503: ": the server was not ready or shutting down"}.get(first.status, "")
    return Finding("errors", CRITICAL, len(failed) / total,
                   f"{len(failed)} of {total} requests failed (first in {name}: {status}, "
                   f"{first.error}){advice}")


def _image_encode(run: _Run) -> Finding | None:
    s = run.image
    share = _share(s, ("image_encode",), "first_token")
    if s is None or share < IMAGE_ENCODE_SHARE:
        return None
    if run.meta.get("projector_on_gpu") is False and run.meta.get("gpu_build"):
        advice = "the vision projector runs on the CPU of a GPU build: set mmproj_use_gpu: true"
    elif run.meta.get("projector_on_gpu") is False:
        advice = ("the vision projector runs on the CPU: use a GPU build of llama.cpp "
                  "(CMAKE_ARGS=-DGGML_CUDA=on) with mmproj_use_gpu, or lower image_max_side")
    else:
        advice = "lower image_max_side, or use a projector with a smaller input size"
    return Finding("image_encode", BOTTLENECK, share,
                   f"image encode is {_pct(share)} of time-to-first-token "
                   f"({_ms(s.median('image_encode'))} of {_ms(s.median('first_token'))}): "
                   f"{advice}")


def _image_prep(run: _Run) -> Finding | None:
    s = run.image
    share = _share(s, ("image_decode", "image_resize"), "first_token")
    if s is None or share < IMAGE_PREP_SHARE:
        return None
    prep = s.median("image_decode") + s.median("image_resize")
    return Finding("image_prep", BOTTLENECK, share,
                   f"decoding and resizing the image is {_pct(share)} of time-to-first-token "
                   f"({_ms(prep)}): send images already downsized to about image_max_side, "
                   "or install pillow-simd")


def _prompt_eval(run: _Run) -> Finding | None:
    candidates = []
    if run.image is not None:
        candidates.append((run.image, _share(run.image, ("prompt_eval",), "first_token"),
                           "time-to-first-token"))
    if run.text is not None:
        candidates.append((run.text, _share(run.text, ("prompt_eval",), "total"),
                           "request time"))
    if not candidates:
        return None
    s, share, of_what = max(candidates, key=lambda c: c[1])
    if share < PROMPT_EVAL_SHARE:
        return None
    layers, on_gpu = run.meta.get("n_layers"), run.meta.get("gpu_layers")
    if layers is not None and on_gpu is not None and on_gpu < layers:
        advice = (f"{on_gpu} of {layers} layers run on the GPU: offload them all "
                  "(n_gpu_layers: -1) in a GPU build")
    else:
        advice = "shorten the prompt (system prompt, history) or raise n_batch and n_ubatch"
    return Finding("prompt_eval", BOTTLENECK, share,
                   f"prompt evaluation is {_pct(share)} of {of_what} in the {s.name} requests "
                   f"({_ms(s.median('prompt_eval'))}): {advice}")


def _generation(run: _Run) -> Finding | None:
    s = run.image or run.text
    share = _share(s, ("generation",), "total")
    if s is None or share < GENERATION_SHARE:
        return None
    return Finding("generation", BOTTLENECK, share,
                   f"generation is {_pct(share)} of request time "
                   f"({s.median('completion_tokens'):.0f} tokens at "
                   f"{s.median('tokens_per_second'):.1f} tok/s): lower max_tokens, offload "
                   "layers to the GPU (n_gpu_layers), or use a smaller quantisation")


def _queue(run: _Run) -> Finding | None:
    s = run.highest
    share = _share(s, ("queue",), "total")
    if s is None or share < QUEUE_SHARE:
        return None
    n_parallel = run.meta.get("n_parallel")
    if n_parallel is not None and n_parallel < s.concurrency:
        advice = (f"raise n_parallel (now {n_parallel}; each slot shares the n_ctx KV "
                  "cache, so raise n_ctx with it)")
    else:
        advice = "the engine is saturated: offload to a GPU or add replicas"
    return Finding("queue", BOTTLENECK, share,
                   f"queue wait dominates at concurrency {s.concurrency} ({_pct(share)} of "
                   f"request time, {_ms(s.median('queue'))}): {advice}")


def _transfer(run: _Run) -> Finding | None:
    s = run.image
    if s is None:
        return None
    # Per request: the part of the client's TTFT the server's clock did not see.
    gaps = [(x.client_ttft_ms - x.timings["first_token"], x.client_ttft_ms) for x in s.ok
            if x.client_ttft_ms and "first_token" in x.timings]
    if not gaps:
        return None
    share = percentile([gap / client for gap, client in gaps], 50)
    outside = percentile([gap for gap, _ in gaps], 50)
    if share < TRANSFER_SHARE or outside < TRANSFER_MIN_MS:
        return None
    return Finding("transfer", BOTTLENECK, share,
                   f"{_pct(share)} of the client's time-to-first-token ({_ms(outside)}) passes "
                   "before the server's clock starts (sending and parsing the base64 image): "
                   "send smaller or more compressed images, or run clients closer to the server")


def _scaling(run: _Run) -> Finding | None:
    low, high = run.lowest, run.highest
    if low is None or high is None or low is high or low.requests_per_s <= 0:
        return None
    gain = high.requests_per_s / low.requests_per_s
    if gain >= SCALING_MIN:
        return None
    n_parallel = run.meta.get("n_parallel")
    if n_parallel == 1:
        advice = "n_parallel is 1, so requests run one at a time: raise it"
    else:
        advice = "the hardware is saturated: offload to a GPU or add replicas"
    return Finding("scaling", ADVICE, 1.0 - gain / high.concurrency,
                   f"throughput grows only {gain:.2f}x from concurrency {low.concurrency} to "
                   f"{high.concurrency} ({low.requests_per_s:.2f} → "
                   f"{high.requests_per_s:.2f} req/s): {advice}")


def _image_cost(run: _Run) -> Finding | None:
    if run.text is None or run.image is None:
        return None
    text, image = run.text.median("first_token"), run.image.median("first_token")
    ratio = f", {image / text:.1f}x" if text > 0 else ""
    return Finding("image_cost", INFO, 0.0,
                   f"an image adds {_ms(image - text)} to time-to-first-token "
                   f"({_ms(text)} text-only → {_ms(image)} with the image{ratio})")


def _largest_stage(run: _Run) -> Finding:
    s = run.image or run.text or _first(x for x in run.all if x.ok)
    if s is None:
        return Finding("none", INFO, 0.0, "no request succeeded: nothing to judge")
    shares = {stage: _share(s, (stage,), "total") for stage in SEQUENTIAL_STAGES}
    stage = max(shares, key=lambda k: shares[k])
    return Finding("balanced", INFO, shares[stage],
                   f"no single bottleneck: the largest stage of the {s.name} requests is "
                   f"{stage} at {_pct(shares[stage])} of request time ({_ms(s.median(stage))})")


RULES: tuple[Callable[[_Run], Finding | None], ...] = (
    _errors, _image_encode, _image_prep, _prompt_eval, _generation, _queue, _transfer,
    _scaling, _image_cost,
)


def _share(s: ScenarioResult | None, parts: tuple[str, ...], whole: str) -> float:
    """Median over requests of sum(parts) / whole."""
    if s is None:
        return 0.0
    ratios = []
    for x in s.ok:
        total = x.value(whole)
        if total:
            ratios.append(sum(x.value(p) or 0.0 for p in parts) / total)
    return percentile(ratios, 50) if ratios else 0.0


def _first(items: Iterable[ScenarioResult]) -> ScenarioResult | None:
    return next(iter(items), None)


def _pct(share: float) -> str:
    return f"{share * 100:.0f} %"


def _ms(value: float) -> str:
    return f"{value / 1000:.2f} s" if value >= 1000 else f"{value:.0f} ms"
