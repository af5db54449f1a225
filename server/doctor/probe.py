"""The doctor's live check: load the model in the real engine, send one text and one image
request through it, and report stage timings and where each stage ran."""

from __future__ import annotations

import asyncio
import io
import time
from typing import Any

from server.config import Settings
from server.doctor.report import Check
from server.engine import Engine, EngineState
from server.engine.placement import Placement
from server.engine.types import (
    ChatMessage,
    DoneEvent,
    ErrorEvent,
    GenerationRequest,
    ImageInput,
    SamplingParams,
    TokenEvent,
)
from server.images import SizeRule
from server.images.decode import decode_image
from server.timings import StageTimer

MAX_TOKENS = 8


def check_engine(settings: Settings, timeout_s: float) -> Check:
    engine = Engine(settings)
    engine.start()
    try:
        deadline = time.monotonic() + timeout_s
        while engine.state in (EngineState.LOADING, EngineState.WARMING):
            if time.monotonic() > deadline:
                return Check("engine", "fail", f"the model did not load and warm up within "
                             f"{timeout_s:.0f} s (--timeout)")
            time.sleep(0.05)
        if engine.state is not EngineState.READY:
            return Check("engine", "fail", f"the engine failed to start: {engine.error}")
        return _run_requests(engine, settings)
    finally:
        engine.stop()


def _run_requests(engine: Engine, settings: Settings) -> Check:
    info = engine.info
    placement = Placement(**info["placement"])
    ran_on = {"image_decode": "CPU (Pillow)", "image_resize": "CPU (Pillow)",
              "image_encode": placement.projector_device or "unknown",
              "prompt_eval": placement.describe_llm(), "generation": placement.describe_llm()}
    results: dict[str, Any] = {}
    kinds = ("text", "image") if info["vision"] else ("text",)
    for kind in kinds:
        timer = StageTimer()
        parts: tuple[str | ImageInput, ...] = ("Say hello.",)
        if kind == "image":
            parts = (_probe_image(info, settings, timer), "Describe the image.")
        request = GenerationRequest(messages=[ChatMessage("user", parts)], max_tokens=MAX_TOKENS,
                                    sampling=SamplingParams(temperature=0.0), timer=timer,
                                    request_id=f"doctor-{kind}", stream=False)
        error = asyncio.run(_complete(engine, request))
        if error:
            return Check("engine", "fail", f"the {kind} request failed: {error}",
                         {"placement": info["placement"], **results})
        results[kind] = timer.as_dict()
    problems = info["placement_warnings"]
    lines = [placement.describe(vision=info["vision"])]
    for kind, timings in results.items():
        stages = ", ".join(f"{stage} {timings[stage]:.1f} ms on {ran_on[stage]}"
                           for stage in ran_on if timings[stage] > 0)
        lines.append(f"{kind}: {timings['total']:.1f} ms total ({stages}); "
                     f"{timings['prompt_tokens']} prompt tokens, "
                     f"{timings['completion_tokens']} generated")
    details = {"placement": info["placement"], "warnings": problems, "stage_ran_on": ran_on,
               **results, "lines": lines}
    if problems:
        return Check("engine", "fail", "; ".join(problems), details)
    answered = "a text and an image request" if info["vision"] else "a text request (text only)"
    return Check("engine", "ok", f"{answered} answered", details)


async def _complete(engine: Engine, request: GenerationRequest) -> str | None:
    async for event in engine.generate(request):
        if isinstance(event, ErrorEvent):
            return event.message
        if isinstance(event, DoneEvent):
            return None
        assert isinstance(event, TokenEvent)
    return "the stream ended without a result"


def _probe_image(info: dict[str, Any], settings: Settings, timer: StageTimer) -> ImageInput:
    """A 640x480 PNG decoded the way the API decodes uploads (same size rule)."""
    from PIL import Image

    image = Image.linear_gradient("L").resize((640, 480)).convert("RGB")
    buf = io.BytesIO()
    image.save(buf, "PNG")
    rule = SizeRule.from_info(info, settings.image_max_side)
    decoded = decode_image(buf.getvalue(), rule)
    timer.images += 1
    timer.add("image_decode", decoded.decode_s)
    timer.add("image_resize", decoded.resize_s)
    return ImageInput(decoded.rgb, decoded.width, decoded.height, decoded.content_hash)
