"""The app's routes as (path, methods): for the Allow header of 405s and for the auth test."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from starlette.routing import BaseRoute, compile_path


@dataclass(frozen=True)
class RouteInfo:
    path: str  # as declared, e.g. /api/v1/files/{file_id}
    methods: frozenset[str]
    regex: re.Pattern[str]


def route_table(routes: Iterable[BaseRoute], prefix: str = "") -> list[RouteInfo]:
    """Every route with its full path; included routers are walked, whichever way the
    FastAPI version keeps them (flattened, or lazily as `original_router` + prefix)."""
    table: list[RouteInfo] = []
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            table += route_table(included.routes, prefix + route.include_context.prefix)
            continue
        path = prefix + getattr(route, "path", "")
        methods = frozenset(getattr(route, "methods", None) or {"GET"})
        table.append(RouteInfo(path, methods, compile_path(path)[0]))
    return table


def allowed_methods(table: list[RouteInfo], path: str) -> list[str]:
    """The methods of every route whose path matches."""
    return sorted({m for info in table if info.regex.match(path) for m in info.methods})
