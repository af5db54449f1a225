"""Cursor pagination of item lists, as OpenAI's (`after`, `limit`, `order`, `has_more`):
a response's input items and a conversation's items."""

from __future__ import annotations

from typing import Any, Literal

from server.api.errors import APIError


def item_page(items: list[dict[str, Any]], *, order: Literal["asc", "desc"], after: str | None,
              limit: int, holder: str) -> dict[str, Any]:
    """One page of `items` (held oldest first); `holder` names what holds them in the
    error for an unknown cursor."""
    span, has_more = page_span([item["id"] for item in items], order=order, after=after,
                               limit=limit, holder=holder)
    return list_page([items[index] for index in span], has_more=has_more)


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
