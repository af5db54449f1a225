"""A batch input file, line by line: OpenAI's request-line format, checked.

A problem with the file as a whole (not UTF-8, empty, too many lines, a custom_id used
twice) fails the batch, as OpenAI's validation does; a problem with one line (not JSON, a
wrong method or url, no body) becomes that line's entry in the error file, and the other
lines run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from server.api.json_depth import json_depth

# The endpoints a batch may target, as OpenAI spells them, and the route each runs on.
ENDPOINTS = {"/v1/chat/completions": "/api/v1/chat/completions",
             "/v1/completions": "/api/v1/completions"}


def _spellings(endpoint: str) -> set[str]:
    """How a line may name the batch's endpoint: /v1/x, /api/v1/x or /x."""
    tail = endpoint.removeprefix("/v1")
    return {endpoint, f"/api/v1{tail}", tail}


@dataclass(frozen=True)
class RequestLine:
    index: int  # 0-based among the file's non-blank lines: the line's identity on resume
    # (errors name a line by its number in the file: line_numbers)
    custom_id: str | None
    body: dict[str, Any] | None  # None: the line is bad, `error` says why
    error: str | None = None


@dataclass(frozen=True)
class FileProblem:
    code: str
    message: str
    line: int | None = None  # 1-based, as OpenAI's batch errors count

    def as_dict(self) -> dict[str, object]:
        return {"code": self.code, "message": self.message, "param": None, "line": self.line}


# Problems listed in a failed batch's `errors.data`, at most (then one entry says how many
# more): a file of one custom_id repeated 50,000 times must not make a megabyte object.
MAX_PROBLEMS = 100


def split_lines(data: bytes) -> list[bytes]:
    """The file's non-blank lines."""
    return [line for line in data.split(b"\n") if line.strip()]


def line_numbers(data: bytes) -> list[int]:
    """Each non-blank line's number in the file (1-based, blank lines counted), as OpenAI's
    batch errors give it; RequestLine.index, which resume goes by, skips blank lines."""
    return [n for n, line in enumerate(data.split(b"\n"), 1) if line.strip()]


def check_upload(data: bytes, max_lines: int) -> str | None:
    """Why an uploaded batch file is refused outright, or None."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return "the batch file is not UTF-8 text"
    n = len(split_lines(data))
    if n == 0:
        return "the batch file has no request lines"
    if n > max_lines:
        return f"the batch file has {n:,} request lines; at most {max_lines:,} are allowed"
    return None


# A line's body may nest as deep as a request's (max_json_depth): the line adds one level.
DEFAULT_MAX_DEPTH = 64


def parse(data: bytes, endpoint: str, max_lines: int, max_depth: int = DEFAULT_MAX_DEPTH
          ) -> tuple[list[RequestLine], list[FileProblem]]:
    """Every line, parsed; and the problems that fail the whole batch (then no line runs).
    A line whose body nests deeper than `max_depth` is an error of that line: it would be a
    400 as a request, and one nested near Python's limit parses here but cannot be encoded
    again where it runs (so it would be retried for ever)."""
    refusal = check_upload(data, max_lines)
    if refusal is not None:
        return [], [FileProblem("invalid_file", refusal)]
    lines = [_parse_line(i, raw, endpoint, max_depth)
             for i, raw in enumerate(split_lines(data))]
    numbers = line_numbers(data)
    seen: dict[str, int] = {}  # custom_id -> the number of the first line using it
    problems: list[FileProblem] = []
    for line in lines:
        if line.custom_id is None:
            continue
        number = numbers[line.index]
        if line.custom_id in seen:
            problems.append(FileProblem(
                "duplicate_custom_id", f"custom_id {line.custom_id!r} is used by lines "
                f"{seen[line.custom_id]} and {number}; each must be unique", number))
        seen.setdefault(line.custom_id, number)
    return lines, capped(problems)


def capped(problems: list[FileProblem]) -> list[FileProblem]:
    """The first MAX_PROBLEMS, then one entry saying how many more were left out."""
    if len(problems) <= MAX_PROBLEMS:
        return problems
    more = len(problems) - MAX_PROBLEMS
    return [*problems[:MAX_PROBLEMS], FileProblem(
        "too_many_errors", f"{more:,} more problems of this file are not listed (the first "
        f"{MAX_PROBLEMS} are)")]


def _parse_line(index: int, raw: bytes, endpoint: str, max_depth: int) -> RequestLine:
    if json_depth(raw) > max_depth + 1:  # counted without parsing: "[[[[..." costs nothing
        return RequestLine(index, None, None, f"the line's JSON is nested too deeply (its "
                           f"body at most {max_depth} levels)")
    try:
        item = json.loads(raw)
    except ValueError:
        return RequestLine(index, None, None, "the line is not valid JSON")
    if not isinstance(item, dict):
        return RequestLine(index, None, None, "the line is not a JSON object")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return RequestLine(index, None, None, "custom_id must be a non-empty string")
    if item.get("method") != "POST":
        return RequestLine(index, custom_id, None, "method must be \"POST\"")
    url = item.get("url")
    if not isinstance(url, str):  # a list or object is unhashable: no set lookup with it
        return RequestLine(index, custom_id, None,
                           f"url must be a string naming the batch's endpoint {endpoint!r}")
    if endpoint not in ENDPOINTS or url not in _spellings(endpoint):
        return RequestLine(index, custom_id, None,
                           f"url must be the batch's endpoint {endpoint!r}, not {url!r}")
    body = item.get("body")
    if not isinstance(body, dict):
        return RequestLine(index, custom_id, None, "body must be a JSON object")
    if body.get("stream"):
        return RequestLine(index, custom_id, None, "stream is not supported in a batch")
    return RequestLine(index, custom_id, body)


def referenced_files(body: dict[str, Any]) -> set[str]:
    """Uploaded images a request names (`{"type": "file", "file": {"file_id": ...}}`)."""
    found: set[str] = set()
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else ():
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else ():
            file = part.get("file") if isinstance(part, dict) else None
            if isinstance(file, dict) and isinstance(file.get("file_id"), str):
                found.add(file["file_id"])
    return found


def dump_line(item: dict[str, Any]) -> str:
    """One JSONL line (compact, as OpenAI writes its output files)."""
    return json.dumps(item, separators=(",", ":"), ensure_ascii=False) + "\n"
