"""The engine's public face: start it, ask whether it is ready, submit → async event stream."""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import Any, TypeVar

from server.config import Settings
from server.engine import llama_log, mtmd
from server.engine.admission import CLIENT_GONE
from server.engine.model import LoadedModel, load_model, update_placement
from server.engine.placement import Placement
from server.engine.prepare import Preparer, PromptRefused
from server.engine.prompt import ChatTemplate
from server.engine.scheduler import QueueFullError, Scheduler
from server.engine.types import (
    ChatMessage,
    DoneEvent,
    EngineEvent,
    ErrorEvent,
    EventSink,
    GenerationRequest,
    ImageInput,
    PromptTokens,
    SamplingParams,
)
from server.engine.watchdog import Watchdog
from server.timings import StageTimer

logger = logging.getLogger("vlserve.engine")
T = TypeVar("T")

__all__ = ["Engine", "EngineNotReadyError", "EngineState", "QueueFullError"]

# After a hang is declared, /health answers 503 this long before the listener closes, so a
# router or probe sees "unhealthy" rather than only connection errors.
HANG_EXIT_DELAY_S = 2.0


class EngineState(enum.Enum):
    LOADING = "loading"
    WARMING = "warming"
    READY = "ok"
    FAILED = "failed"
    STOPPED = "stopped"


class EngineNotReadyError(RuntimeError):
    pass


class _Discard:
    def put(self, event: EngineEvent) -> None:
        if isinstance(event, ErrorEvent):
            raise RuntimeError(f"warm-up request failed: {event.message}")


class Engine:
    """Owns the engine thread; that thread alone touches the llama and mtmd contexts."""

    def __init__(self, settings: Settings,
                 on_failure: Callable[[], None] | None = None,
                 on_ready: Callable[[dict[str, Any]], None] | None = None) -> None:
        """`on_failure` runs on the engine thread if loading, warm-up or the loop fails;
        `on_ready` there once requests are served, with `info`."""
        self.settings = settings
        self._on_failure = on_failure
        self._on_ready = on_ready
        self.state = EngineState.LOADING
        self.error: str | None = None
        self.info: dict[str, Any] = {}
        self.warmup_seconds: float | None = None
        self._model: LoadedModel | None = None
        self._scheduler: Scheduler | None = None
        self._preparer: Preparer | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="vlserve-engine", daemon=True)
        self.watchdog = Watchdog(settings.engine_watchdog_s, self._hung)
        self.hung = False  # the watchdog fired: the engine thread is stuck for good

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.watchdog.stop()
        if self._thread.is_alive() and not self.hung:  # a stuck thread never joins
            self._thread.join(timeout)

    @property
    def ready(self) -> bool:
        return self.state is EngineState.READY

    @property
    def template(self) -> ChatTemplate | None:
        """The model's chat template, once loaded (the API asks it how answers begin)."""
        return self._model.template if self._model is not None else None

    @property
    def queue_depth(self) -> int:
        return self._scheduler.queue_depth if self._scheduler else 0

    @property
    def busy_slots(self) -> int:
        return self._scheduler.busy_slots if self._scheduler else 0

    def slot_states(self) -> list[dict[str, object]]:
        return self._scheduler.slot_states() if self._scheduler else []

    @property
    def preencode_backlog(self) -> int:
        return self._scheduler.preencode_backlog if self._scheduler else 0

    def preencode(self, image: ImageInput, tenant: str = "") -> None:
        """Queue an image for encoding into `tenant`'s embedding cache at low priority."""
        if self._scheduler is not None and self._model is not None and self._model.vision:
            self._scheduler.submit_preencode(image, tenant)

    def is_encoded(self, cache_id: str, tenant: str = "") -> bool:
        """Whether `tenant` has the image's embedding cached, by ImageInput.cache_id (from
        another thread: a dict probe)."""
        return self._scheduler is not None and self._scheduler.is_encoded(cache_id, tenant)

    @property
    def preemptions(self) -> int:
        return self._scheduler.preemptions if self._scheduler else 0

    @property
    def next_turn_tokens(self) -> int:
        return self._scheduler.next_turn_tokens if self._scheduler else 0

    @property
    def kv_cells_used(self) -> int:
        # Read from other threads: a sum of ints the engine thread updates, no lock needed.
        return self._scheduler.kv_cells_used if self._scheduler else 0

    @property
    def prompt_cache_ram_bytes(self) -> int:
        """Bytes of idle sequences kept in host RAM (an int the engine thread updates)."""
        ram = self._scheduler.ram_cache if self._scheduler else None
        return ram.bytes if ram is not None else 0

    def prompt_cache_ram_counts(self) -> tuple[int, int, int]:
        """Copies to RAM made ahead (engine idle), made when needed, and restores (ints the
        engine thread updates)."""
        ram = self._scheduler.ram_cache if self._scheduler else None
        if ram is None:
            return 0, 0, 0
        return ram.copies_ahead, ram.copies_needed, ram.restores

    @property
    def kv_cells_running(self) -> int:
        return self._scheduler.kv_cells_running if self._scheduler else 0

    async def generate(self, request: GenerationRequest) -> AsyncIterator[EngineEvent]:
        """Stream events for one request; stopping early cancels its generation."""
        scheduler = self._require_ready()
        prompt = await self._prepare(request)
        if isinstance(prompt, ErrorEvent):
            yield prompt
            return
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[EngineEvent] = asyncio.Queue()
        scheduler.submit(request, prompt, EventSink(loop, events))
        async for event in _drain(events, request):
            yield event

    async def generate_choices(self, request: GenerationRequest, n: int
                               ) -> list[AsyncIterator[EngineEvent]]:
        """`n` completions of one prompt (`n > 1`): one event stream per choice. The prompt
        is prepared and evaluated once; choice i samples with `seed + i` when a seed is
        given. They share `request.cancelled`. A refused prompt gives one stream, with its
        error; a full queue raises QueueFullError."""
        scheduler = self._require_ready()
        prompt = await self._prepare(request)
        if isinstance(prompt, ErrorEvent):
            return [_once(prompt)]
        loop = asyncio.get_running_loop()
        choices = [request, *(_sibling(request, i) for i in range(1, n))]
        queues: list[asyncio.Queue[EngineEvent]] = [asyncio.Queue() for _ in choices]
        sinks = [EventSink(loop, queue) for queue in queues]
        scheduler.submit(request, prompt, sinks[0], siblings=list(zip(choices[1:], sinks[1:],
                                                                          strict=True)))
        return [_drain(queue, choice) for queue, choice in zip(queues, choices, strict=True)]

    async def tokenize(self, request: GenerationRequest, *, add_special: bool = True,
                       pieces: bool = False) -> PromptTokens | ErrorEvent:
        """The request's prompt as the model would read it (POST /tokenize), counted in a
        worker thread: the engine thread and its slots are not involved."""
        self._require_ready()
        assert self._preparer is not None
        try:
            return await _in_thread(partial(self._preparer.count, request,
                                            add_special=add_special, pieces=pieces))
        except PromptRefused as refused:
            return refused.event
        except Exception:
            logger.exception("request %s could not be tokenized", request.request_id)
            return ErrorEvent(500, "the server could not tokenize this request",
                              code="internal_error")

    async def detokenize(self, tokens: Sequence[int], *, special: bool = True) -> str:
        """The text of token ids (each checked to be in the vocabulary by the caller);
        special: control tokens written out (else, as generated text shows them: not)."""
        self._require_ready()
        assert self._preparer is not None
        try:
            return await _in_thread(partial(self._preparer.detokenize, tokens,
                                            special=special))
        except PromptRefused as refused:  # closing: the model is about to be freed
            raise EngineNotReadyError(refused.event.message) from None

    async def echo(self, tokens: Sequence[int]) -> str:
        """What a text completion's `echo` repeats of a token-id prompt: the text its
        `logprobs.tokens` join to (server/engine/prompt_text.py)."""
        self._require_ready()
        assert self._preparer is not None
        try:
            return await _in_thread(partial(self._preparer.echo, tokens))
        except PromptRefused as refused:  # closing: the model is about to be freed
            raise EngineNotReadyError(refused.event.message) from None

    def _require_ready(self) -> Scheduler:
        if self.state is not EngineState.READY or self._scheduler is None \
                or self._preparer is None:
            raise EngineNotReadyError(f"the model is {self.state.value}")
        return self._scheduler

    async def _prepare(self, request: GenerationRequest
                       ) -> mtmd.TokenizedPrompt | ErrorEvent:
        """The request's tokenized prompt, or the event that answers it instead."""
        assert self._preparer is not None
        if request.cancelled.is_set():  # gone already (e.g. while its images decoded)
            return CLIENT_GONE
        try:
            prompt = await _off_loop(self._preparer.prepare, request)
        except PromptRefused as refused:
            return refused.event
        except Exception:
            # One request's content must not take anything else down with it.
            logger.exception("request %s failed before it started", request.request_id)
            return ErrorEvent(500, "the server could not prepare this request",
                              code="internal_error")
        if request.cancelled.is_set():  # the client left while its prompt was prepared
            prompt.close()
            return CLIENT_GONE
        return prompt

    # --- engine thread ----------------------------------------------------------------
    def _main(self) -> None:
        try:
            started = time.perf_counter()
            self._model = load_model(self.settings)
            self.info = dict(self._model.info, load_seconds=round(time.perf_counter() - started, 3))
            self._scheduler = Scheduler(self._model, self.settings, self.watchdog)
            self._preparer = Preparer(self._model, self.settings.system_prompt,
                                      self.settings.prompt_lookup)
            self._log_startup()
            if self.settings.warmup:
                self.state = EngineState.WARMING
                self._warm_up()
            self.state = EngineState.READY
            # Only from here: a first call's allocations (or a GPU's kernel compilation)
            # during warm-up may be slow without being hung.
            self.watchdog.start()
            logger.info("engine ready")
            if self._on_ready is not None:
                self._on_ready(self.info)
            self._scheduler.run(self._stop)
            self.state = EngineState.STOPPED
        except Exception as exc:
            self.error = str(exc)
            self.state = EngineState.FAILED  # /health 503; new requests 503
            logger.exception("engine failed: %s", exc)
            self._answer_all_after_failure()
            if self._on_failure is not None:
                self._on_failure()  # the CLI exits non-zero, so a supervisor restarts us
        finally:
            if self._scheduler is not None:
                self._scheduler.close()
            if self._preparer is not None:
                self._preparer.gate.close()  # no tokenizing thread still uses the model
            if self._model is not None:
                self._model.close()

    def _hung(self, what: str, elapsed: float) -> None:
        """From the watchdog thread: the engine thread is stuck in `what`. Say so on /health,
        answer every request, and have the process exit non-zero (a restart is the cure)."""
        self.hung = True
        self.error = (f"the engine hung: {what} had not returned after {elapsed:.0f} s "
                      f"(engine_watchdog_s = {self.settings.engine_watchdog_s:g})")
        self.state = EngineState.FAILED
        if self._scheduler is not None:
            self._scheduler.abandon_all(ErrorEvent(
                500, "the inference engine hung; the server is restarting, retry shortly",
                code="engine_hung"))
        time.sleep(HANG_EXIT_DELAY_S)
        if self._on_failure is not None:
            self._on_failure()

    def _answer_all_after_failure(self) -> None:
        """Requests running or queued get a 500 now rather than hang until the exit."""
        if self._scheduler is None:
            return
        try:
            self._scheduler.refuse_all(ErrorEvent(
                500, "the inference engine failed; the server is restarting, retry shortly",
                code="engine_failed"))
        except Exception:
            logger.exception("could not answer the requests in flight")

    def _warm_up(self) -> None:
        """Run one real request (with an image, if the model reads them) so first-call
        allocations happen before traffic."""
        assert self._scheduler is not None and self._preparer is not None
        assert self._model is not None
        started = time.perf_counter()
        parts = (_warmup_image(), "Describe the image.") if self._model.vision else ("Hello.",)
        request = GenerationRequest(
            messages=[ChatMessage("user", parts)],
            max_tokens=4,
            sampling=SamplingParams(temperature=0.0),
            request_id="warmup",
            timeout_s=math.inf,  # a slow machine must not fail its own warm-up
        )
        with llama_log.record() as encode_log:  # clip.cpp reports its backend's gaps here
            prompt = self._preparer.prepare(request)
            self._scheduler.run_to_completion(request, prompt, _Discard())
        self._scheduler.measure_step_costs()
        self._scheduler.share_prefix_of_slot(0)
        self._reread_placement(encode_log)
        self.warmup_seconds = round(time.perf_counter() - started, 3)
        self.info["warmup_seconds"] = self.warmup_seconds
        logger.info("warm-up done in %.2f s (timings %s)", self.warmup_seconds,
                    request.timer.as_dict())

    def _reread_placement(self, encode_log: list[str]) -> None:
        assert self._model is not None
        before = set(self.info["placement_warnings"])
        update_placement(self._model, self.settings, self._model.load_log + encode_log)
        self.info.update(self._model.info)
        for warning in self.info["placement_warnings"]:
            if warning not in before:
                logger.warning("%s", warning)

    def _log_startup(self) -> None:
        info = self.info
        logger.info("model %s, projector %s", info["model_path"],
                    info["mmproj_path"] or "none (text only: image requests get 400)")
        logger.info("context %d tokens, %d slot(s), %d layers, loaded in %.2f s",
                    info["n_ctx"], info["n_parallel"], info["n_layers"], info["load_seconds"])
        logger.info("%s (read back from llama.cpp's load log)",
                    Placement(**info["placement"]).describe(vision=info["vision"]))
        for warning in info["placement_warnings"]:
            logger.warning("%s", warning)
        if info["description"]:
            logger.warning("model note: %s", info["description"])
        logger.info("llama.cpp system info: %s", info["system_info"])


async def _off_loop(prepare: Callable[[GenerationRequest], mtmd.TokenizedPrompt],
                    request: GenerationRequest) -> mtmd.TokenizedPrompt:
    """Run `prepare` in a worker thread. If the caller is cancelled meanwhile, the thread
    still finishes: its prompt is then freed here rather than leaked."""
    future = _in_thread(partial(prepare, request))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        future.add_done_callback(_close_result)
        raise


def _in_thread(call: Callable[[], T]) -> asyncio.Future[T]:
    """`call()` in a worker thread. A StopIteration escaping it (a stray next()) becomes a
    RuntimeError: raised into an asyncio future it would leave the future, and so the
    request, waiting forever."""
    def guarded() -> T:
        try:
            return call()
        except StopIteration as exc:
            raise RuntimeError(f"StopIteration escaped {call!r}") from exc

    return asyncio.get_running_loop().run_in_executor(None, guarded)


def _close_result(future: asyncio.Future[mtmd.TokenizedPrompt]) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().close()


async def _drain(events: asyncio.Queue[EngineEvent], request: GenerationRequest
                 ) -> AsyncIterator[EngineEvent]:
    """A request's events up to its last; a consumer that stops early cancels it."""
    try:
        while True:
            event = await events.get()
            yield event
            if isinstance(event, DoneEvent | ErrorEvent):
                return
    finally:
        request.cancelled.set()


async def _once(event: EngineEvent) -> AsyncIterator[EngineEvent]:
    yield event


def _sibling(request: GenerationRequest, index: int) -> GenerationRequest:
    """Choice `index` of an `n > 1` request: its own sampler seed and timer; the same
    prompt, limits and cancellation."""
    seed = request.sampling.seed
    sampling = request.sampling if seed is None else replace(request.sampling,
                                                             seed=seed + index)
    return replace(request, sampling=sampling, timer=StageTimer(started=request.timer.started))


def _warmup_image() -> ImageInput:
    side = 64
    rgb = bytes((x * 4) % 256 for y in range(side) for x in range(side) for _ in range(3))
    return ImageInput(rgb=rgb, width=side, height=side, content_hash="vlserve-warmup")
