"""Cursor pagination of item lists, as OpenAI's (`after`, `limit`, `order`, `has_more`):
a response's input items and a conversation's items."""

from __future__ import annotations

from typing import Any, Literal

from server.api.errors import APIError


def item_page(items: list[dict[str, Any]], *, order: Literal["asc", "desc"], after: str | None,
              limit: int, holder: str) -> dict[str, Any]:
    """One page of `items` (held oldest first); `holder` names what holds them in the
    error for an unknown cursor."""
    ordered = list(items) if order == "asc" else items[::-1]
    if after is not None:
        ids = [item["id"] for item in ordered]
        if after not in ids:
            raise APIError(400, f"after: no item with id {after!r} in this {holder}",
                           param="after", code="invalid_cursor")
        ordered = ordered[ids.index(after) + 1:]
    return list_page(ordered[:limit], has_more=len(ordered) > limit)


def list_page(page: list[dict[str, Any]], *, has_more: bool) -> dict[str, Any]:
    """OpenAI's list object around one page of objects (each with an `id`)."""
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": has_more}
