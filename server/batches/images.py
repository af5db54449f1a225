"""Uploaded images a batch names by file id, kept with the batch until it ends.

Uploads live in memory for a while (or in the shared store); a batch may outlive them, and
a restart loses them. So when a batch is created, the images its lines name are copied
beside it (on disk, or in Redis where any replica that takes the batch over reads them)
and held with it; its lines resolve those ids to these copies
(server/api/internal.py), whatever became of the uploads since.
"""

from __future__ import annotations

import asyncio
from typing import Any

from server.batches.redis_store import BatchStorage
from server.engine import ImageInput
from server.uploads import StoredFile, Uploads


async def keep(store: BatchStorage, uploads: Uploads, batch_id: str, owner: str,
               file_ids: set[str]) -> dict[str, StoredFile]:
    """At validation: copy the owner's images beside the batch (the disk writes on a worker
    thread). An id the owner has no upload for is left out: its line fails as a chat naming
    it would."""
    kept: dict[str, StoredFile] = {}
    for file_id in sorted(file_ids):
        record = await uploads.get(file_id, owner)
        if record is not None:
            await asyncio.to_thread(store.save_image, batch_id, _meta(record), record.image.rgb)
            kept[file_id] = record
    return kept


def restore(store: BatchStorage, batch_id: str) -> dict[str, StoredFile]:
    """After a restart: the copies, as they were kept."""
    kept: dict[str, StoredFile] = {}
    for meta, rgb in store.load_images(batch_id):
        image = ImageInput(rgb, meta["width"], meta["height"], meta["content_hash"])
        source = meta.get("source_size")
        kept[meta["id"]] = StoredFile(meta["id"], meta["filename"], meta["purpose"],
                                      meta["bytes"], meta["created_us"], image, meta["owner"],
                                      (source[0], source[1]) if source else None)
    return kept


def _meta(record: StoredFile) -> dict[str, Any]:
    return {"id": record.id, "filename": record.filename, "purpose": record.purpose,
            "bytes": record.bytes, "created_us": record.created_us,
            "width": record.image.width, "height": record.image.height,
            "content_hash": record.image.content_hash, "owner": record.owner,
            "source_size": list(record.source_size) if record.source_size else None}
