"""Per-image `detail` (low | high | auto): which size rule an image is decoded to, and an
upload (kept at the `high` size) brought down to the size a chat asks for."""

from __future__ import annotations

from functools import partial
from typing import Literal

from server.api.state import AppState
from server.engine import ImageInput
from server.images import SizeRule
from server.images.rescale import rescale_cost, rescale_rgb
from server.timings import StageTimer
from server.uploads import StoredFile

Detail = Literal["auto", "low", "high", "original"]


def size_rule(state: AppState, detail: str | None) -> SizeRule:
    """The rule for `detail`; None and `auto` are the configured default. The engine's model
    info holds one per detail; fixed-size projectors get the same rule for all three."""
    return SizeRule.from_info(state.engine.info, state.settings.image_max_side,
                              "high" if detail == "original" else detail or "auto")


def _derived(image: ImageInput, box: tuple[int, int]) -> str:
    """The content hash of a stored upload resized to `box`: it names the stored size it came
    from, as these pixels differ (by resampling) from the original file decoded to `box`."""
    return image.content_hash if box == (image.width, image.height) \
        else f"{image.content_hash}<{image.width}x{image.height}"


def _box(upload: StoredFile, state: AppState, detail: str | None) -> tuple[int, int]:
    """The size `detail` gives the upload: worked out from the file's own size, as for the
    same file sent inline (rules that round to whole cells would drift if applied to the
    already rounded stored size), never larger than what is stored."""
    image = upload.image
    source = upload.source_size or (image.width, image.height)
    box = size_rule(state, detail).box(*source)
    return (image.width, image.height) if box[0] * box[1] >= image.width * image.height \
        else box


def upload_cache_id(upload: StoredFile, state: AppState, detail: str | None) -> str:
    """The cache id the upload gets at `detail` (ImageInput.cache_id), without resizing it."""
    box = _box(upload, state, detail)
    return f"{_derived(upload.image, box)}@{box[0]}x{box[1]}"


async def upload_at(upload: StoredFile, state: AppState, detail: str | None,
                    timer: StageTimer | None = None) -> ImageInput:
    """An upload as a chat with `detail` uses it: as stored for `high` (or when it is small
    enough anyway), else resized off the event loop within the decode memory budget."""
    image = upload.image
    width, height = image.width, image.height
    box = _box(upload, state, detail)
    if box == (width, height):
        return image
    out = await state.decode_budget.run(rescale_cost(width, height),
                                        partial(rescale_rgb, image.rgb, width, height, box))
    if timer is not None:
        timer.add("image_resize", out.resize_s)
    return ImageInput(out.rgb, out.width, out.height, _derived(image, box))
