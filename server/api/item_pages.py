"""Cursor pagination of item lists, as OpenAI's (`after`, `limit`, `order`, `has_more`):
a response's input items, a conversation's items (spliced from their stored JSON:
server.api.stored_items), stored chat completions, files, batches."""

from __future__ import annotations

from typing import Any, Literal

from server.api.errors import APIError


def page_span(ids: list[str], *, order: Literal["asc", "desc"], after: str | None,
              limit: int, holder: str) -> tuple[list[int], bool]:
    """Where one page of the items with `ids` (held oldest first) is: their indices in page
    order, and whether more follow."""
    ordered = list(range(len(ids))) if order == "asc" else list(range(len(ids)))[::-1]
    if after is not None:
        if after not in ids:
            raise APIError(400, f"after: no item with id {after!r} in this {holder}",
                           param="after", code="invalid_cursor")
        ordered = ordered[ordered.index(ids.index(after)) + 1:]
    return ordered[:limit], len(ordered) > limit


def list_page(page: list[dict[str, Any]], *, has_more: bool) -> dict[str, Any]:
    """OpenAI's list object around one page of objects (each with an `id`)."""
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": has_more}
