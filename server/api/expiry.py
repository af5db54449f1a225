"""OpenAI's file expiry policy, `{"anchor": "created_at", "seconds": N}`: an upload's
`expires_after` (form fields `expires_after[anchor]`, `expires_after[seconds]`, as the SDK
sends them) and a batch's `output_expires_after` (JSON)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from server.api.errors import APIError

MIN_S = 3600  # OpenAI's bounds: one hour to 30 days
MAX_S = 30 * 86400


class ExpiresAfter(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    anchor: Literal["created_at"]  # the file's creation, not the batch's
    seconds: int = Field(ge=MIN_S, le=MAX_S)


def form_expiry(fields: dict[str, str]) -> int | None:
    """Seconds an upload asks to be kept (None: no policy given); a 400 for a bad one."""
    anchor = fields.get("expires_after[anchor]")
    seconds = fields.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise APIError(400, "expires_after[anchor] must be \"created_at\"",
                       param="expires_after.anchor", code="invalid_expires_after")
    # ASCII digits only: str.isdigit() also takes "³", which int() refuses (a 500).
    if seconds is None or not re.fullmatch(r"[0-9]{1,10}", seconds) or \
            not MIN_S <= int(seconds) <= MAX_S:
        raise APIError(400, f"expires_after[seconds] must be a whole number of seconds from "
                       f"{MIN_S} to {MAX_S}", param="expires_after.seconds",
                       code="invalid_expires_after")
    return int(seconds)
