"""Uploaded images a batch names by file id: pinned in the upload store while the batch
runs, and kept on disk with it, so a restarted server still has them (uploads themselves
live in memory only)."""

from __future__ import annotations

import logging
from typing import Any

from server.batches.store import BatchStore
from server.engine import ImageInput
from server.uploads import StoredFile, UploadStore

logger = logging.getLogger("vlserve.batches")


def keep(store: BatchStore, uploads: UploadStore, batch_id: str, owner: str,
         file_ids: set[str]) -> None:
    """At validation: write the images beside the batch (on a worker thread; `restore`
    then pins them). An id the owner has no upload for is left to fail in its line."""
    for file_id in sorted(file_ids):
        record = uploads.get(file_id, owner)
        if record is not None:
            store.save_image(batch_id, _meta(record), record.image.rgb)


def restore(store: BatchStore, uploads: UploadStore, batch_id: str, owner: str,
            file_ids: set[str]) -> None:
    """After a restart: put the batch's images back into the upload store, pinned."""
    uploads.pin(file_ids, owner)
    for meta, rgb in store.load_images(batch_id):
        image = ImageInput(rgb, meta["width"], meta["height"], meta["content_hash"])
        source = meta.get("source_size")
        uploads.restore(StoredFile(meta["id"], meta["filename"], meta["purpose"],
                                   meta["bytes"], meta["created_us"], image, meta["owner"],
                                   tuple(source) if source else None))


def release(store: BatchStore, uploads: UploadStore, batch_id: str, owner: str,
            file_ids: set[str]) -> None:
    """At the batch's end: unpin (the upload's own TTL applies again), drop the copy."""
    uploads.unpin(file_ids, owner)
    store.drop_images(batch_id)


def _meta(record: StoredFile) -> dict[str, Any]:
    return {"id": record.id, "filename": record.filename, "purpose": record.purpose,
            "bytes": record.bytes, "created_us": record.created_us,
            "width": record.image.width, "height": record.image.height,
            "content_hash": record.image.content_hash, "owner": record.owner,
            "source_size": list(record.source_size) if record.source_size else None}
