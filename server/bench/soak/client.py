"""One soak client: sends request after request until the deadline and judges each answer.

Every answer gets exactly one verdict: `ok` (200, streams complete with [DONE]), `429`
(with Retry-After; the client then waits as told), `bad_4xx` (a bad request refused with
the expected status), `abandoned` (a stream the client hung up on after its first token,
as planned) or `other` (anything else: a 5xx, a wrong status, a broken stream, a
connection error or a timeout). A sound server has no `other`.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

import httpx

from server.bench.soak.workload import BadRequest, Image, chat_body, pick_kind

VERDICTS = ("ok", "429", "bad_4xx", "abandoned", "other")


@dataclass(frozen=True)
class Outcome:
    kind: str  # text, image, upload, upload_chat, upload_delete, stream, abandon, bad
    verdict: str  # one of VERDICTS
    status: int  # HTTP status; 0 when no answer came (connection error, timeout)
    latency_s: float
    finished_at: float  # time.monotonic()
    detail: str = ""  # for `other`: what was wrong
    chat: bool = False  # sent to /chat/completions with the key: the server counts it


@dataclass(frozen=True)
class ClientPlan:
    index: int
    deadline: float  # time.monotonic() after which no new request starts
    max_tokens: int
    images: list[Image]
    bad: list[BadRequest]
    auth: dict[str, str]
    seed: int


class SoakClient:
    def __init__(self, http: httpx.AsyncClient, plan: ClientPlan, sink: list[Outcome]) -> None:
        self.http = http
        self.plan = plan
        self.sink = sink
        self.rng = random.Random(plan.seed)
        self.count = 0

    async def run(self) -> None:
        while time.monotonic() < self.plan.deadline:
            self.count += 1
            kind = pick_kind(self.rng)
            try:
                wait = await getattr(self, f"_{kind}")()
            except httpx.HTTPError as exc:  # no answer at all
                self._record(kind, "other", 0, time.monotonic(), f"{type(exc).__name__}: {exc}")
                wait = 0.0
            if wait:  # 429: back off as the server asked, but not past the deadline
                await asyncio.sleep(min(wait, max(0.0, self.plan.deadline - time.monotonic())))

    # --- request kinds: each returns the seconds to wait before the next request ----------
    async def _text(self) -> float:
        return await self._chat("text", chat_body(self._prompt(), self._tokens()))

    async def _image(self) -> float:
        image = self.rng.choice(self.plan.images)
        return await self._chat("image", chat_body(self._prompt(), self._tokens(),
                                                   image_url=image.data_url))

    async def _upload(self) -> float:
        image = self.rng.choice(self.plan.images)
        started = time.monotonic()
        answer = await self.http.post("/files", files={"file": ("soak", image.data, image.mime)})
        if self._judge("upload", answer, started) != "ok":
            return _retry_after(answer)
        file_id = answer.json()["id"]
        wait = await self._chat("upload_chat", chat_body(self._prompt(), self._tokens(),
                                                         file_id=file_id))
        started = time.monotonic()
        self._judge("upload_delete", await self.http.delete(f"/files/{file_id}"), started)
        return wait

    async def _stream(self) -> float:
        return await self._streamed("stream", abandon=False)

    async def _abandon(self) -> float:
        return await self._streamed("abandon", abandon=True)

    async def _bad(self) -> float:
        bad = self.rng.choice(self.plan.bad)
        request = self.http.build_request(bad.method, bad.path, content=bad.body,
                                          headers=bad.headers)
        if not bad.with_key:
            request.headers.pop("Authorization", None)
        started = time.monotonic()
        answer = await self.http.send(request)
        chat = bad.path == "/chat/completions" and bad.with_key
        if answer.status_code == bad.expect:
            self._record("bad", "bad_4xx", answer.status_code, started, chat=chat)
        else:
            self._record("bad", "other", answer.status_code, started,
                         f"{bad.name}: expected {bad.expect}, got {_describe(answer)}",
                         chat=chat)
        return 0.0

    # --- helpers --------------------------------------------------------------------------
    async def _chat(self, kind: str, body: bytes) -> float:
        started = time.monotonic()
        answer = await self.http.post("/chat/completions", content=body,
                                      headers={"content-type": "application/json"})
        self._judge(kind, answer, started)
        return _retry_after(answer)

    async def _streamed(self, kind: str, *, abandon: bool) -> float:
        body = chat_body(self._prompt(), self._tokens() * 2, stream=True)
        started = time.monotonic()
        async with self.http.stream("POST", "/chat/completions", content=body,
                                    headers={"content-type": "application/json"}) as answer:
            if answer.status_code != 200:
                await answer.aread()
                self._judge(kind, answer, started)
                return _retry_after(answer)
            last, events, error = "", 0, ""
            async for line in answer.aiter_lines():
                if not line.startswith("data: "):
                    continue
                events += 1
                last = line[6:]
                if last.startswith('{"error"'):
                    error = last[:200]
                if abandon and events >= 2:  # the role chunk, then a token: hang up
                    self._record(kind, "abandoned", 200, started)
                    return 0.0  # leaving the block closes the connection mid-stream
        if error or last != "[DONE]":
            self._record(kind, "other", 200, started, error or f"stream ended with {last!r}")
        else:
            self._record(kind, "abandoned" if abandon else "ok", 200, started)
        return 0.0

    def _judge(self, kind: str, answer: httpx.Response, started: float) -> str:
        status = answer.status_code
        if status == 200:
            verdict, detail = "ok", ""
        elif status == 429 and answer.headers.get("retry-after"):
            verdict, detail = "429", ""
        else:
            verdict, detail = "other", _describe(answer)
        self._record(kind, verdict, status, started, detail)
        return verdict

    def _record(self, kind: str, verdict: str, status: int, started: float,
                detail: str = "", *, chat: bool | None = None) -> None:
        now = time.monotonic()
        if chat is None:
            chat = kind not in ("upload", "upload_delete", "bad")
        self.sink.append(Outcome(kind, verdict, status, now - started, now, detail, chat))

    def _prompt(self) -> str:
        # Unique per request: nothing is answered from a cache of identical prompts.
        return f"[soak {self.plan.index}-{self.count}] Say something about the weather."

    def _tokens(self) -> int:
        return self.rng.randint(max(1, self.plan.max_tokens // 4), self.plan.max_tokens)


def _retry_after(answer: httpx.Response) -> float:
    if answer.status_code != 429:
        return 0.0
    try:
        return float(answer.headers.get("retry-after", "1"))
    except ValueError:
        return 1.0


def _describe(answer: httpx.Response) -> str:
    try:
        message = answer.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = answer.text[:160]
    return f"{answer.status_code} {message}"[:240]
