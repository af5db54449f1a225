"""The stores' per-key shares, split again when the API keys change (server.api.keyring):
with shares still split among the keys of the start, more keys would add up to more than
a store, and a full store would push one key's entries out for another's."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from server.api.chat_store import ChatStore, chat_store_bounds
from server.api.conversation_store import Conversations, conversation_bounds
from server.api.response_store import Responses, response_store
from server.batches.quota import batch_file_quota
from server.store import Bounds
from server.uploads import Uploads, upload_store

if TYPE_CHECKING:
    from server.api.state import AppState

logger = logging.getLogger("vlserve")


def share_among(state: AppState, keys: int) -> None:
    """Each store's shares from now on: an even split among `keys` keys. A key over its
    new share keeps its entries until its next one evicts its own oldest (or they expire):
    nothing is deleted here."""
    settings = state.settings
    stores: list[tuple[Uploads | Responses | Conversations | ChatStore, Bounds]] = [
        (state.uploads, upload_store(settings, keys).bounds),
        (state.responses, response_store(settings, keys).bounds),
        (state.conversations, conversation_bounds(settings, keys)),
        (state.chat_store, chat_store_bounds(settings, keys)),
    ]
    for store, bounds in stores:
        store.bounds = store.table.bounds = bounds
    state.batch_quota = batch_file_quota(settings, keys)
    logger.info("store shares split among %d key(s)", keys)
