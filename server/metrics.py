"""Prometheus metrics: one registry per app, request observations read from the StageTimer."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from server import __version__
from server.batches.job import STATUSES
from server.config import Settings
from server.engine import Engine, EngineState
from server.gpu_metrics import nvml_collector
from server.images.pixel_cache import PixelCache
from server.store.memory import MemoryTable
from server.timings import SEQUENTIAL_STAGES, StageTimer

# From a cached-prefix millisecond to a two-minute CPU generation.
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0, 120.0)


class Metrics:
    """The server's collectors. Gauges read the engine at scrape time; nothing polls."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        # A registry per app (not the global one), so several apps can live in one process.
        self.registry = registry = CollectorRegistry()
        # `first_token` and `total` overlap the sequential stages, so they get their own
        # histograms: summing vlserve_stage_seconds over `stage` stays meaningful.
        self.stage_seconds = Histogram(
            "vlserve_stage_seconds", "Time spent in each sequential stage of a chat request",
            ["stage", "has_images"], buckets=SECONDS_BUCKETS, registry=registry)
        self.first_token_seconds = Histogram(
            "vlserve_time_to_first_token_seconds", "Request arrival to first generated token",
            ["has_images"], buckets=SECONDS_BUCKETS, registry=registry)
        self.request_seconds = Histogram(
            "vlserve_request_duration_seconds", "Request arrival to the end of the response",
            ["has_images"], buckets=SECONDS_BUCKETS, registry=registry)
        self.requests = Counter(
            "vlserve_requests_total", "Chat completion requests by HTTP status and finish "
            "reason (499: the client went away)", ["status", "finish_reason"], registry=registry)
        self.prompt_tokens = Counter(
            "vlserve_prompt_tokens_total", "Prompt tokens, image tokens included",
            registry=registry)
        self.image_tokens = Counter(
            "vlserve_image_tokens_total", "Prompt tokens that came from images", registry=registry)
        self.cached_tokens = Counter(
            "vlserve_cached_tokens_total", "Prompt tokens reused from the KV cache",
            registry=registry)
        self.completion_tokens = Counter(
            "vlserve_completion_tokens_total", "Generated tokens", registry=registry)
        self.image_cache_hits = Counter(
            "vlserve_image_cache_hits_total", "Images whose embedding was reused, not encoded",
            registry=registry)
        self.image_cache_misses = Counter(
            "vlserve_image_cache_misses_total", "Images that went through the vision encoder",
            registry=registry)
        self.constrained_requests = Counter(
            "vlserve_constrained_requests_total", "Chat requests whose answer a grammar "
            "constrains, by kind", ["kind"], registry=registry)
        self.grammar_resamples = Counter(
            "vlserve_grammar_resamples_total", "Tokens drawn again because the grammar "
            "refused the first draw", registry=registry)
        self.prediction_tokens = Counter(
            "vlserve_prediction_tokens_total", "Predicted Outputs: draft tokens of requests' "
            "`prediction` the answer kept (accepted) or not (rejected, evaluated in vain)",
            ["result"], registry=registry)
        self.lookup_tokens = Counter(
            "vlserve_lookup_tokens_total", "Prompt lookup: draft tokens from requests' own "
            "text the answer kept (accepted) or not (rejected, evaluated in vain)",
            ["result"], registry=registry)
        for result in ("accepted", "rejected"):  # shown at 0 from the start
            self.prediction_tokens.labels(result)
            self.lookup_tokens.labels(result)
        self.uploads = Counter(
            "vlserve_uploads_total", "Files accepted by the upload endpoint", registry=registry)
        # The API's other calls (server.api.api_calls), by route template and method.
        self.api_calls = Counter(
            "vlserve_api_calls_total", "Calls to the API other than generation (files, "
            "batches, stored responses, conversations, models, ...) by route, method and "
            "HTTP status", ["route", "method", "status"], registry=registry)
        self.api_call_seconds = Histogram(
            "vlserve_api_call_duration_seconds", "Time to answer those calls",
            ["route", "method"], buckets=SECONDS_BUCKETS, registry=registry)
        # Alert on these: a rotated key some clients still send, or someone guessing keys.
        self.auth_rejections = Counter(
            "vlserve_auth_rejections_total", "Requests refused with 401: no API key, or one "
            "that is not configured", ["reason"], registry=registry)
        for reason in ("missing", "invalid"):
            self.auth_rejections.labels(reason)
        self.batch_requests = Counter(
            "vlserve_batch_requests_total", "Batch lines by how they ended (completed: a 2xx "
            "answer; failed: an error answer, a bad line or the window expired; cancelled: "
            "never run because the batch was cancelled)", ["state"], registry=registry)
        for state in ("completed", "failed", "cancelled"):  # shown at 0 from the start
            self.batch_requests.labels(state)
        # Alert on these: a snapshot that stopped being written loses a crash's worth more.
        self.snapshot_writes = Counter(
            "vlserve_state_snapshot_writes_total", "State snapshot writes (state_snapshot) "
            "by result; unchanged tables are not written", ["result"], registry=registry)
        for result in ("written", "failed"):
            self.snapshot_writes.labels(result)
        self.snapshot_written_at = Gauge(
            "vlserve_state_snapshot_last_write_timestamp_seconds", "When the state snapshot "
            "was last written (Unix time; 0: not yet)", registry=registry)
        # Set by the app to the batch runner's counts by status (read at scrape time).
        self.batch_statuses: Callable[[], dict[str, int]] = dict
        registry.register(_BatchGauge(self))
        self._engine_gauges(settings, engine)
        registry.register(_BuildCollector(settings, engine))
        registry.register(_EngineCounters(engine))
        ProcessCollector(registry=registry)
        self.gpu = nvml_collector()
        if self.gpu is not None:
            registry.register(self.gpu)

    def _engine_gauges(self, settings: Settings, engine: Engine) -> None:
        def gauge(name: str, doc: str, read: Callable[[], float]) -> None:
            Gauge(name, doc, registry=self.registry).set_function(read)

        gauge("vlserve_slots", "Parallel sequences (n_parallel)", lambda: settings.n_parallel)
        gauge("vlserve_prompt_cache_ram_bytes", "Idle slots' KV kept in host RAM "
              "(bounded by prompt_cache_ram_mb)", lambda: engine.prompt_cache_ram_bytes)
        gauge("vlserve_busy_slots", "Slots serving a request now", lambda: engine.busy_slots)
        gauge("vlserve_queue_depth", "Requests waiting for a slot", lambda: engine.queue_depth)
        gauge("vlserve_kv_cells", "KV cache size in cells (n_ctx)",
              lambda: engine.info.get("n_ctx", settings.n_ctx))
        gauge("vlserve_kv_cells_used", "KV cache cells in use, idle slots' reusable prefixes "
              "included (counted as positions)", lambda: engine.kv_cells_used)
        # The model-server contract that load-aware routers read (the inference gateway's
        # endpoint picker, llm-d): one unlabelled series each, KV usage as a 0-1 ratio of the
        # cells running requests hold (idle prefixes would make an idle server read busy).
        gauge("vlserve_num_requests_waiting", "Requests waiting for a slot",
              lambda: engine.queue_depth)
        gauge("vlserve_num_requests_running", "Requests being generated (busy slots)",
              lambda: engine.busy_slots)
        gauge("vlserve_kv_cache_usage_ratio", "Share (0-1) of the KV cache that running "
              "requests hold; idle slots' reusable prefixes not counted",
              lambda: min(1.0, engine.kv_cells_running
                          / max(1, engine.info.get("n_ctx", settings.n_ctx))))
        gauge("vlserve_model_loaded", "1 once the model is loaded",
              lambda: int(engine.state in (EngineState.WARMING, EngineState.READY)))
        gauge("vlserve_model_warm", "1 once warm-up is done and requests are served",
              lambda: int(engine.ready))
        gauge("vlserve_warmup_seconds", "How long the warm-up request took",
              lambda: engine.warmup_seconds or 0.0)

    def observe_request(self, status: int, finish_reason: str | None,
                        timer: StageTimer | None) -> None:
        """Count one chat request; stages and tokens only for those that completed."""
        self.requests.labels(str(status), finish_reason or "none").inc()
        if timer is None or finish_reason is None:
            return
        has_images = "true" if timer.images else "false"
        stages = timer.stages_ms
        for stage in SEQUENTIAL_STAGES:
            # Image stages of a text-only request are not zero-cost samples, they are absent.
            if timer.images or not stage.startswith("image_"):
                self.stage_seconds.labels(stage, has_images).observe(stages[stage] / 1000.0)
        if timer.completion_tokens:  # a prompt scored only (max_tokens 0) has no first token
            self.first_token_seconds.labels(has_images).observe(stages["first_token"] / 1000.0)
        self.request_seconds.labels(has_images).observe(stages["total"] / 1000.0)
        self.prompt_tokens.inc(timer.prompt_tokens)
        self.image_tokens.inc(timer.image_tokens)
        self.cached_tokens.inc(timer.cached_tokens)
        self.completion_tokens.inc(timer.completion_tokens)
        self.image_cache_hits.inc(timer.image_cache_hits)
        self.grammar_resamples.inc(timer.grammar_resamples)
        self.prediction_tokens.labels("accepted").inc(timer.accepted_prediction_tokens)
        self.prediction_tokens.labels("rejected").inc(timer.rejected_prediction_tokens)
        self.lookup_tokens.labels("accepted").inc(timer.accepted_lookup_tokens)
        self.lookup_tokens.labels("rejected").inc(timer.rejected_lookup_tokens)
        self.image_cache_misses.inc(max(0, timer.images - timer.image_cache_hits))

    def watch_pixel_cache(self, cache: PixelCache) -> None:
        self.registry.register(_PixelCacheCollector(cache))

    def watch_state(self, tables: Mapping[str, tuple[MemoryTable[Any], object]],
                    background_running: Callable[[], int]) -> None:
        """The in-process stores by name (a live mapping: tables made later show up too)
        and the background responses running here."""
        self.registry.register(_StateCollector(tables, background_running))

    def watch_snapshot(self, held: Callable[[], bool]) -> None:
        """Whether this server holds its state_snapshot (0: another server has the file,
        this one keeps nothing in it until it does); only with a snapshot configured."""
        Gauge("vlserve_state_snapshot_held", "1 while this server holds its state_snapshot "
              "file; 0 while another server holds it (nothing kept until it lets go)",
              registry=self.registry).set_function(lambda: float(held()))

    def observe_snapshot(self, written: bool) -> None:
        self.snapshot_writes.labels("written" if written else "failed").inc()
        if written:
            self.snapshot_written_at.set_to_current_time()

    def observe_upload(self) -> None:
        self.uploads.inc()

    def observe_api_call(self, route: str, method: str, status: int, seconds: float) -> None:
        self.api_calls.labels(route, method, str(status)).inc()
        self.api_call_seconds.labels(route, method).observe(seconds)

    def observe_auth_rejection(self, reason: str) -> None:
        self.auth_rejections.labels(reason).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of every collector."""
        return generate_latest(self.registry)


class _BatchGauge(Collector):
    """vlserve_batches{status}: every status present, zeros included, so dashboards see it."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("vlserve_batches", "Batches by status", labels=["status"])
        counts = self._metrics.batch_statuses()
        for status in STATUSES:
            family.add_metric([status], counts.get(status, 0))
        yield family


class _StateCollector(Collector):
    """vlserve_store_{entries,bytes}{store}: what each in-process table holds, read from its
    own counters (no walk). Absent with a shared store (Redis): the numbers are the
    cluster's, not this replica's, and reading them would cost a round trip per scrape."""

    def __init__(self, tables: Mapping[str, tuple[MemoryTable[Any], object]],
                 background_running: Callable[[], int]) -> None:
        self._tables = tables
        self._background_running = background_running

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self._tables:
            entries = GaugeMetricFamily(
                "vlserve_store_entries", "Entries an in-process store holds (stored "
                "responses, conversations, chat completions, uploaded files), expired ones "
                "until swept", labels=["store"])
            kept = GaugeMetricFamily(
                "vlserve_store_bytes", "Bytes an in-process store holds, as its bounds count "
                "them (JSON of records; decoded pixels of uploads)", labels=["store"])
            for name, (table, _) in sorted(self._tables.items()):
                count, used = table.usage()
                entries.add_metric([name], count)
                kept.add_metric([name], used)
            yield entries
            yield kept
        yield GaugeMetricFamily(
            "vlserve_background_responses_running", "Background responses this process "
            "runs now (waiting for a slot or generating)", self._background_running())


class _EngineCounters(Collector):
    """Counts the engine keeps itself (a request may be preempted and then abandoned, so
    they cannot be summed from finished requests' timers)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(
            "vlserve_preemptions", "Times a running request stepped aside because the KV "
            "cache was full (it resumes later, nothing lost)", self._engine.preemptions)
        yield CounterMetricFamily(
            "vlserve_next_turn_tokens", "Tokens an idle engine evaluated ahead of a "
            "conversation's next turn (its end-of-turn markup)", self._engine.next_turn_tokens)
        ahead, needed, restores = self._engine.prompt_cache_ram_counts()
        copies = CounterMetricFamily(
            "vlserve_prompt_cache_ram_copies", "Idle sequences copied to the RAM prompt cache: "
            "ahead (while the engine idled) or needed (while requests ran: every stream "
            "waited)", labels=["when"])
        copies.add_metric(["ahead"], ahead)
        copies.add_metric(["needed"], needed)
        yield copies
        yield CounterMetricFamily(
            "vlserve_prompt_cache_ram_restores", "Conversations whose KV came back from the "
            "RAM prompt cache instead of being evaluated again", restores)


class _PixelCacheCollector(Collector):
    """The decoded-pixel cache (server/images/pixel_cache.py), read at scrape time."""

    def __init__(self, cache: PixelCache) -> None:
        self._cache = cache

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        cache = self._cache
        yield CounterMetricFamily(
            "vlserve_image_pixel_cache_hits", "Images whose decoded pixels were reused (the "
            "same bytes sent again, e.g. by the next turn of a chat)", cache.hits)
        yield CounterMetricFamily(
            "vlserve_image_pixel_cache_misses", "Images decoded from their bytes", cache.misses)
        yield GaugeMetricFamily("vlserve_image_pixel_cache_bytes", "Decoded pixels kept for "
                                "reuse (bounded by image_pixel_cache_mb)", cache.used_bytes)


class _BuildCollector(Collector):
    """Build and placement as info metrics, read from the engine at scrape time: where the
    model runs is only known once llama.cpp has loaded it (read back from its load log)."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self._model_name = settings.model_name
        self._engine = engine

    def collect(self) -> Iterator[InfoMetricFamily | GaugeMetricFamily]:
        info = self._engine.info
        yield InfoMetricFamily("vlserve_build", "Server version, served model, llama.cpp build",
                               value={"version": __version__, "model": self._model_name,
                                      "llama_cpp_python": info.get("llama_cpp_python", ""),
                                      "backends": ",".join(info.get("backends", []))})
        placement = info.get("placement")
        if placement is None:  # not loaded yet
            return
        yield InfoMetricFamily(
            "vlserve_placement", "Where llama.cpp put the model, read back from its load log",
            value={"llm_device": placement["llm_device"],
                   "projector_device": placement["projector_device"] or "unknown",
                   "flash_attn": placement["flash_attn"] or "unknown",
                   "kv_type_k": placement["kv_type_k"] or "unknown",
                   "kv_type_v": placement["kv_type_v"] or "unknown"})
        yield GaugeMetricFamily("vlserve_gpu_layers", "Layers llama.cpp offloaded to a GPU "
                                "(output layer included), read back", placement["gpu_layers"])
