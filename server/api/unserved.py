"""OpenAI request fields this server cannot serve, refused rather than silently ignored,
and the service tier it reports.

An app that asks for a web search or terse answers and gets a plain answer with a 200
would take it for what it asked; a 400 that names the field tells it at once.
"""

from __future__ import annotations

from typing import Any

from server.api.errors import APIError
from server.api.protocol import ServiceTier, Verbosity

# One tier here: every request runs as any other ("flex" and "priority" included), and the
# answer says so, as OpenAI's does when a tier is not available to the project.
SERVED_TIER = "default"


def refuse_unserved(*, verbosity: Verbosity | None, verbosity_param: str,
                    web_search: dict[str, Any] | None = None) -> None:
    """400 for a web search, or a verbosity other than the model's own ("medium")."""
    if web_search is not None:
        raise APIError(400, "web_search_options: this server cannot search the web; leave "
                       "web_search_options out", param="web_search_options",
                       code="unsupported_parameter")
    if verbosity not in (None, "medium"):
        raise APIError(400, f"{verbosity_param}: this model has no verbosity control (only "
                       f"'medium', its own, is accepted), not '{verbosity}'",
                       param=verbosity_param, code="unsupported_value")


def tier_echo(asked: ServiceTier | None) -> dict[str, str]:
    """The `service_tier` an answer reports: only when the request named one."""
    return {} if asked is None else {"service_tier": SERVED_TIER}
