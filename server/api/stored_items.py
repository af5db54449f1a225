"""Input items as stored responses and conversations keep them: each the JSON it is listed
as, encoded once when stored (their images are megabytes of data URL), so a page of them is
spliced bytes (server.api.json_pages), never a JSON encode on the event loop. They are
decoded back into objects only where a request goes on from them (a continuation, a turn
on a conversation), in a worker thread, one item at a time."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from server.api.item_pages import page_span
from server.api.json_pages import Buffer, Parts, encoded, list_parts


@dataclass(frozen=True)
class StoredItem:
    id: str
    json: Buffer  # the item as listed, with its id: JSON


def stored_items(items: list[dict[str, Any]]) -> list[StoredItem]:
    """`items` (each with an id) encoded (off the event loop when they may hold images)."""
    return [StoredItem(item["id"], encoded(item)) for item in items]


def item_values(items: list[StoredItem]) -> list[dict[str, Any]]:
    """The items as objects again (call it in a worker thread: between items the GIL is
    given back, so each holds it only for its own parse)."""
    return [json.loads(bytes(item.json)) for item in items]


def items_size(items: list[StoredItem]) -> int:
    """Bytes of JSON, what the stores' byte bounds count."""
    return sum(len(item.json) for item in items)


def item_page_parts(items: list[StoredItem], *, order: Literal["asc", "desc"],
                    after: str | None, limit: int, holder: str) -> Parts:
    """One page of `items` (held oldest first), OpenAI's list object spliced from their
    JSON."""
    span, has_more = page_span([item.id for item in items], order=order, after=after,
                               limit=limit, holder=holder)
    return list_parts([(items[i].id, [items[i].json]) for i in span], has_more=has_more)


def item_lines(items: list[StoredItem]) -> bytes:
    """The items one JSON value a line (compact JSON holds no raw newline): a record's
    body, whose lines read back without a parse (json_pages.lines)."""
    return b"\n".join(item.json for item in items)


def items_from_lines(ids: list[str], lines: list[memoryview]) -> list[StoredItem]:
    return [StoredItem(item_id, line) for item_id, line in zip(ids, lines, strict=True)]
