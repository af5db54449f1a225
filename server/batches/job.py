"""One batch: its OpenAI object, its status machine, and the result lines it produces.

Statuses as OpenAI's: validating → in_progress → finalizing → completed, or failed (the
input file as a whole is invalid), expired (the completion window ran out), cancelling →
cancelled. The object is what `GET /batches/{id}` returns; it is also what is saved on
disk (plus the owner), so a restart picks up exactly where it was.
"""

from __future__ import annotations

import re
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from server.batches.lines import RequestLine
from server.uploads import StoredFile

TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
STATUSES = ("validating", "in_progress", "finalizing", "completed", "failed", "expired",
            "cancelling", "cancelled")
_WINDOW = re.compile(r"([1-9][0-9]{0,6})([smhd])")  # whole: fullmatch, no "24h\n"
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# The longest completion window taken: a batch holds its input, results log and images
# until it ends, so a window of years would keep them (and its expires_at) that long.
MAX_WINDOW_S = 7 * 86400


def window_seconds(window: str) -> int | None:
    """"24h" (OpenAI's only value) and other whole durations ("30m", "2d") up to
    MAX_WINDOW_S; None if not one."""
    match = _WINDOW.fullmatch(window)
    if match is None:
        return None
    seconds = int(match.group(1)) * _UNIT_S[match.group(2)]
    return seconds if seconds <= MAX_WINDOW_S else None


def new_batch(owner: str, input_file_id: str, endpoint: str, window: str,
              metadata: dict[str, str] | None) -> dict[str, Any]:
    now_us = time.time_ns() // 1000
    now = now_us // 1_000_000
    seconds = window_seconds(window)
    assert seconds is not None
    return {
        "id": f"batch_{secrets.token_hex(16)}", "object": "batch", "endpoint": endpoint,
        "errors": None, "input_file_id": input_file_id, "completion_window": window,
        "status": "validating", "output_file_id": None, "error_file_id": None,
        "created_at": now, "in_progress_at": None, "expires_at": now + seconds,
        "finalizing_at": None, "completed_at": None, "failed_at": None, "expired_at": None,
        "cancelling_at": None, "cancelled_at": None,
        "request_counts": {"total": 0, "completed": 0, "failed": 0},
        # Ours, not OpenAI's: the owner, and the creation time to the microsecond that
        # orders listings (created_at has whole seconds only).
        "metadata": metadata, "_owner": owner, "_created_us": now_us,
    }


def public(batch: dict[str, Any]) -> dict[str, Any]:
    """The object as the API shows it (the owner is ours, not OpenAI's)."""
    return {k: v for k, v in batch.items() if not k.startswith("_")}


def set_status(batch: dict[str, Any], status: str) -> None:
    batch["status"] = status
    stamp = {"in_progress": "in_progress_at", "finalizing": "finalizing_at",
             "completed": "completed_at", "failed": "failed_at", "expired": "expired_at",
             "cancelling": "cancelling_at", "cancelled": "cancelled_at"}.get(status)
    if stamp is not None:
        batch[stamp] = int(time.time())


def result_line(line: RequestLine, status: int | None, body: Any, request_id: str | None,
                error: dict[str, str] | None = None) -> dict[str, Any]:
    """A results-log entry: OpenAI's output/error line, plus the input line's index (`_i`),
    which is what resume goes by."""
    response = None if status is None else {
        "status_code": status, "request_id": request_id, "body": body}
    return {"id": f"batch_req_{secrets.token_hex(12)}", "custom_id": line.custom_id,
            "response": response, "error": error, "_i": line.index}


def succeeded(result: dict[str, Any]) -> bool:
    response = result.get("response")
    return bool(response) and 200 <= response["status_code"] < 300


@dataclass
class BatchJob:
    """The live state of a batch that is not finished: its lines and what is done."""

    batch: dict[str, Any]
    lines: list[RequestLine] = field(default_factory=list)
    done: set[int] = field(default_factory=set)  # indices with a result on disk
    running: dict[int, Any] = field(default_factory=dict)  # index → the line's cancel event
    retry_at: dict[int, float] = field(default_factory=dict)  # index → monotonic time
    images: dict[str, StoredFile] = field(default_factory=dict)  # uploads its lines name
    queue: deque[int] = field(default_factory=deque)  # line indices still to run

    @property
    def id(self) -> str:
        return self.batch["id"]

    @property
    def owner(self) -> str:
        return self.batch.get("_owner", "")

    def record(self, result: dict[str, Any]) -> None:
        self.done.add(result["_i"])
        counts = self.batch["request_counts"]
        counts["completed" if succeeded(result) else "failed"] += 1

    def start(self, lines: list[RequestLine], results: list[dict[str, Any]]) -> None:
        """Take the parsed input and what the results log already holds (on resume)."""
        self.lines = lines
        self.batch["request_counts"] = {"total": len(lines), "completed": 0, "failed": 0}
        for result in results:
            if result.get("_i") not in self.done:  # never counted twice, even if logged so
                self.record(result)
        self.queue = deque(line.index for line in lines if line.index not in self.done)

    def next_line(self, now: float) -> RequestLine | None:
        """The next line neither done, running nor waiting to retry."""
        for _ in range(len(self.queue)):
            index = self.queue[0]
            if self.retry_at.get(index, 0.0) > now:
                self.queue.rotate(-1)
                continue
            self.queue.popleft()
            return self.lines[index]
        return None

    def retry(self, line: RequestLine, at: float) -> None:
        """Run the line again later (the server was busy or going down; nothing recorded)."""
        self.retry_at[line.index] = at
        self.queue.append(line.index)

    def all_done(self) -> bool:
        return len(self.done) >= len(self.lines)


def ended_at(batch: dict[str, Any]) -> int:
    """When a finished batch reached its final status (seconds since the epoch)."""
    stamps = (batch.get(k) for k in ("completed_at", "failed_at", "expired_at", "cancelled_at"))
    return max((s for s in stamps if s is not None), default=batch["created_at"])


def order_key(batch: dict[str, Any]) -> tuple[int, str]:
    """Creation order, to the microsecond, then id: a total order for listings."""
    return batch.get("_created_us", batch["created_at"] * 1_000_000), batch["id"]
