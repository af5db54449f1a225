"""The bench's verdict rules on recorded timings (no server needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.bench.results import Sample, ScenarioResult, ServerInfo, percentile
from server.bench.verdict import (
    ADVICE,
    BOTTLENECK,
    CRITICAL,
    IMAGE_ENCODE_SHARE,
    judge,
)

DATA = Path(__file__).parent / "data"

CPU = {"projector_on_gpu": False, "gpu_layers": 0, "n_layers": 32, "n_parallel": 1}
GPU = {"projector_on_gpu": True, "gpu_layers": 32, "n_layers": 32, "n_parallel": 4}


def sample(client_ttft: float | None = None, **stages: float) -> Sample:
    """A successful request with the given stage times (ms); the rest is derived."""
    timings = dict.fromkeys(("queue", "image_decode", "image_resize", "image_encode",
                             "prompt_eval", "generation"), 0.0)
    timings.update(stages)
    before_first = sum(v for k, v in timings.items() if k != "generation")
    timings.setdefault("first_token", before_first)
    timings.setdefault("total", before_first + timings["generation"])
    timings.setdefault("completion_tokens", 64)
    timings.setdefault("tokens_per_second",
                       64 / (timings["generation"] / 1000) if timings["generation"] else 0)
    ttft = timings["first_token"] + 5 if client_ttft is None else client_ttft
    return Sample(ok=True, status=200, client_total_ms=timings["total"] + 5,
                  client_ttft_ms=ttft, timings=timings)


def scenario(name: str, samples: list[Sample], concurrency: int = 1,
             wall_s: float | None = None) -> ScenarioResult:
    kind = "text" if name == "text" else "image"
    if wall_s is None:
        wall_s = sum(s.client_total_ms for s in samples) / 1000 / concurrency
    return ScenarioResult(name, kind, concurrency, wall_s, samples)


def run(meta: dict, text: Sample, image: Sample, levels: dict[int, Sample] | None = None,
        n: int = 5) -> list[ScenarioResult]:
    out = [scenario("text", [text] * n), scenario("image", [image] * n)]
    for c, s in (levels or {}).items():
        out.append(scenario(f"c={c}", [s] * max(n, 2 * c), concurrency=c))
    return out


def server(meta: dict) -> ServerInfo:
    return ServerInfo(url="http://127.0.0.1:7860", model="m", meta=meta)


# LLaVA-1.5-7B Q4 on a CPU-only build (as in CONTEXT.md: the projector silently on the CPU).
TEXT_CPU = sample(queue=0.1, prompt_eval=350, generation=2600)
IMAGE_CPU = sample(queue=0.1, image_decode=9, image_resize=4, image_encode=4100,
                   prompt_eval=1500, generation=2700)


def test_projector_on_the_cpu_is_named() -> None:
    verdict = judge(run(CPU, TEXT_CPU, IMAGE_CPU), server(CPU))
    assert verdict.bottleneck.rule == "image_encode"
    assert verdict.bottleneck.message.startswith("image encode is 73 % of time-to-first-token")
    assert "runs on the CPU" in verdict.bottleneck.message
    notes = {f.rule: f for f in verdict.findings}
    assert "adds 5.26 s to time-to-first-token" in notes["image_cost"].message


def test_gpu_build_with_the_projector_on_the_cpu() -> None:
    meta = {**CPU, "gpu_build": True}
    verdict = judge(run(meta, TEXT_CPU, IMAGE_CPU), server(meta))
    assert "set mmproj_use_gpu: true" in verdict.bottleneck.message


def test_projector_on_the_gpu_gets_other_advice() -> None:
    verdict = judge(run(GPU, TEXT_CPU, IMAGE_CPU), server(GPU))
    assert verdict.bottleneck.rule == "image_encode"
    assert "CPU" not in verdict.bottleneck.message
    assert "image_max_side" in verdict.bottleneck.message


def test_threshold_is_inclusive() -> None:
    image = sample(image_encode=IMAGE_ENCODE_SHARE * 1000, prompt_eval=500 - 1e-9,
                   generation=100)
    verdict = judge([scenario("image", [image])], server(GPU))
    assert verdict.bottleneck.rule == "image_encode"


def test_big_photos_name_decoding() -> None:
    image = sample(image_decode=95, image_resize=40, image_encode=60, prompt_eval=80,
                   generation=150)
    verdict = judge(run(GPU, sample(prompt_eval=20, generation=150), image), server(GPU))
    assert verdict.bottleneck.rule == "image_prep"
    assert "pillow-simd" in verdict.bottleneck.message
    assert "49 %" in verdict.bottleneck.message


def test_prompt_eval_on_cpu_layers_suggests_offload() -> None:
    text = sample(prompt_eval=900, generation=300)
    image = sample(image_encode=50, prompt_eval=900, generation=300)
    verdict = judge(run(CPU, text, image), server(CPU))
    assert verdict.bottleneck.rule == "prompt_eval"
    assert "0 of 32 layers run on the GPU" in verdict.bottleneck.message
    verdict = judge(run(GPU, text, image), server(GPU))
    assert "shorten the prompt" in verdict.bottleneck.message


def test_generation_dominates() -> None:
    image = sample(image_encode=40, prompt_eval=60, generation=3000)
    verdict = judge(run(GPU, sample(prompt_eval=30, generation=3000), image), server(GPU))
    assert verdict.bottleneck.rule == "generation"
    assert "97 % of request time" in verdict.bottleneck.message
    assert "lower max_tokens" in verdict.bottleneck.message


def test_queue_at_high_concurrency_names_n_parallel() -> None:
    one = sample(image_encode=300, prompt_eval=300, generation=600)
    eight = sample(queue=8400, image_encode=300, prompt_eval=300, generation=600)
    levels = {1: one, 8: eight}
    scenarios = run(CPU, sample(prompt_eval=100, generation=600), one, levels)
    # Same throughput at 1 and 8: requests ran one at a time.
    scenarios[-1].wall_s = scenarios[-2].wall_s * len(scenarios[-1].samples) / 5
    verdict = judge(scenarios, server(CPU))
    assert verdict.bottleneck.rule == "queue"
    assert verdict.bottleneck.message.startswith("queue wait dominates at concurrency 8")
    assert "raise n_parallel (now 1" in verdict.bottleneck.message
    scaling = next(f for f in verdict.findings if f.rule == "scaling")
    assert scaling.severity == ADVICE
    assert "grows only 1.00x from concurrency 1 to 8" in scaling.message


def test_slow_upload_is_named() -> None:
    image = sample(client_ttft=700, image_decode=20, image_encode=100, prompt_eval=100,
                   generation=200)
    verdict = judge(run(GPU, sample(prompt_eval=50, generation=200), image), server(GPU))
    assert verdict.bottleneck.rule == "transfer"
    assert "before the server's clock starts" in verdict.bottleneck.message


def test_errors_come_first_but_do_not_hide_the_bottleneck() -> None:
    failed = Sample(ok=False, status=429, client_total_ms=3, error="the request queue is full")
    scenarios = run(CPU, TEXT_CPU, IMAGE_CPU)
    scenarios.append(scenario("c=8", [IMAGE_CPU] * 10 + [failed] * 6, concurrency=8))
    verdict = judge(scenarios, server(CPU))
    assert verdict.bottleneck.rule == "image_encode"
    first = verdict.findings[0]
    assert first.rule == "errors" and first.severity == CRITICAL
    assert first.message.startswith("6 of 26 requests failed (first in c=8: HTTP 429")
    assert "raise max_queue" in first.message


def test_no_rule_fires_names_the_largest_stage() -> None:
    image = sample(queue=10, image_decode=30, image_resize=10, image_encode=100,
                   prompt_eval=120, generation=150)
    verdict = judge(run(GPU, sample(prompt_eval=100, generation=150), image), server(GPU))
    assert verdict.bottleneck.rule == "balanced"
    assert "the largest stage of the image requests is generation" in verdict.bottleneck.message
    assert all(f.severity < BOTTLENECK for f in verdict.findings)


def test_findings_are_ranked() -> None:
    image = sample(image_decode=500, image_encode=1200, prompt_eval=200, generation=100)
    verdict = judge(run(CPU, sample(prompt_eval=100, generation=300), image), server(CPU))
    rules = [verdict.bottleneck.rule] + [f.rule for f in verdict.findings]
    assert rules[:2] == ["image_encode", "image_prep"]
    severities = [f.severity for f in verdict.findings]
    assert severities == sorted(severities, reverse=True)


def test_recorded_demo_run_gives_the_recorded_verdict() -> None:
    """A bench JSON recorded against the demo server: samples in, the same verdict out."""
    recorded = json.loads((DATA / "bench-demo.json").read_text())
    scenarios = [ScenarioResult.from_dict(s) for s in recorded["scenarios"]]
    verdict = judge(scenarios, ServerInfo(**recorded["server"]))
    assert verdict.to_dict() == recorded["verdict"]
    for s, data in zip(scenarios, recorded["scenarios"], strict=True):
        assert s.summary() == data["summary"]


@pytest.mark.parametrize(("values", "q", "expected"), [
    ([5.0], 95, 5.0),
    ([1.0, 2.0, 3.0, 4.0], 50, 2.5),
    ([4.0, 1.0, 3.0, 2.0], 0, 1.0),
    ([1.0, 2.0, 3.0, 4.0, 5.0], 95, 4.8),
    ([10.0, 20.0], 100, 20.0),
])
def test_percentile(values: list[float], q: float, expected: float) -> None:
    assert percentile(values, q) == pytest.approx(expected)
