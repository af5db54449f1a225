"""What the routes share: settings, the engine, the stores, metrics and the drain state."""

from __future__ import annotations

import os
import secrets
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from server.api.background import BackgroundRuns
from server.api.background_marks import StopMarks
from server.api.chat_store import ChatStore, open_chat_store
from server.api.conversation_locks import Locks, open_conversation_locks
from server.api.conversation_store import Conversations, open_conversations
from server.api.drain import Drain
from server.api.response_store import Responses, open_responses
from server.batches.quota import FileQuota, batch_file_quota
from server.batches.redis_store import BatchStorage, RedisBatchStore
from server.batches.store import BatchStore
from server.config import Settings
from server.engine import Engine
from server.images import ImageLimits
from server.images.budget import DecodeBudget
from server.images.pixel_cache import PixelCache
from server.metrics import Metrics
from server.store import StateBackend
from server.uploads import Uploads, open_uploads

if TYPE_CHECKING:
    from server.batches.runner import BatchRunner


@dataclass
class AppState:
    settings: Settings
    engine: Engine
    metrics: Metrics
    # Where uploads and stored responses live (server.store): this process or Redis.
    backend: StateBackend
    drain: Drain = field(default_factory=Drain)
    started_at: int = field(default_factory=lambda: int(time.time()))
    # Memory of the image decodes in flight, chats and uploads together.
    decode_budget: DecodeBudget = field(init=False)
    # Decoded pixels of images seen lately: the next turn of an image chat skips the decode.
    pixel_cache: PixelCache = field(init=False)
    uploads: Uploads = field(init=False)  # POST /files
    responses: Responses = field(init=False)  # stored responses (POST /responses)
    conversations: Conversations = field(init=False)  # POST /conversations
    chat_store: ChatStore = field(init=False)  # stored chat completions (`store: true`)
    # The conversations a response is running on (one at a time each): in this process,
    # or among the replicas sharing a Redis store.
    conversation_locks: Locks = field(init=False)
    background: BackgroundRuns = field(init=False)  # background responses run here
    # Cancels and deletes of background responses another replica runs (shared store).
    stop_marks: StopMarks = field(init=False)
    # Batch files, state and results: on disk, or in Redis when the state is shared.
    batch_store: BatchStorage = field(init=False)
    batch_quota: FileQuota = field(init=False)  # what uploads of batch files may take
    batches: BatchRunner | None = None  # set by the app once it exists

    def __post_init__(self) -> None:
        self.decode_budget = DecodeBudget(self.settings.image_decode_budget_mb * 1024 * 1024)
        self.pixel_cache = PixelCache(self.settings.image_pixel_cache_mb * 1024 * 1024)
        self.metrics.watch_pixel_cache(self.pixel_cache)
        self.uploads = open_uploads(self.settings, self.backend)
        self.responses = open_responses(self.settings, self.backend)
        self.conversations = open_conversations(self.settings, self.backend)
        self.chat_store = open_chat_store(self.settings, self.backend)
        # A lease its request failed to give back (a stream never started) lapses once no
        # request could still be running.
        self.conversation_locks = open_conversation_locks(self.backend,
                                                          self.settings.request_timeout + 60)
        self.background = BackgroundRuns(self.drain, self.settings.background_max_runs,
                                         self.settings.background_max_runs_per_key)
        self.stop_marks = StopMarks(self.backend)
        self.metrics.watch_state(self.backend.memory_tables, lambda: self.background.running)
        self.batch_store = _batch_store(self.settings, self.backend)
        self.batch_quota = batch_file_quota(self.settings)

    def cache_tenant(self, client: str) -> str:
        """Whose engine caches a client (server.api.auth.client_identity) may use: its own,
        unless the operator lets every key share them (`cache_sharing`)."""
        return "" if self.settings.cache_sharing else client

    @property
    def image_limits(self) -> ImageLimits:
        settings = self.settings
        return ImageLimits(settings.image_max_bytes, settings.image_max_pixels,
                           settings.image_min_side, frozenset(settings.image_formats),
                           max_decode_bytes=settings.image_decode_max_mb * 1024 * 1024)


def _batch_store(settings: Settings, backend: StateBackend) -> BatchStorage:
    if not backend.shared:
        return BatchStore(settings.batch_dir)
    # This process's name in batch leases: readable (the replica id) and unique (a
    # restarted replica must not mistake its predecessor's leases for its own).
    token = f"{settings.replica_id or socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
    return RedisBatchStore(settings.state_url, token, settings.state_timeout_s)
