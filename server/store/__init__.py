"""Cross-replica state: per-client bounded tables that uploads, stored responses (and the
batch jobs) keep their records in, in this process's memory or in Redis.

One setting picks the backend (`state_url`): `memory://` keeps today's single-box store,
`redis://host:port/db` shares it among replicas. Either way a table enforces the same
bounds (server.store.bounds): TTL, per-owner count and bytes, the table's own count and
bytes. What stays per replica: the engine's image embeddings and KV (a miss re-encodes).
"""

from server.store.backend import StateBackend, open_backend
from server.store.bounds import Bounds, StateUnavailable, TableFull
from server.store.table import Codec, Table, put_within_share

__all__ = ["Bounds", "Codec", "StateBackend", "StateUnavailable", "Table", "TableFull",
           "open_backend", "put_within_share"]
