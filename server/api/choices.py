"""`n > 1`: the choices' event streams interleaved as they come, each event tagged with its
choice's index."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import TypeVar

from server.engine import DoneEvent, ErrorEvent

E = TypeVar("E")


def _last(event: object) -> bool:
    return isinstance(event, DoneEvent | ErrorEvent)


async def merge_choices(choices: Sequence[tuple[AsyncIterator[E], E]]
                        ) -> AsyncIterator[tuple[int, E]]:
    """Every choice's first event, then the rest in arrival order, until each has sent its
    last (Done or Error). One choice is passed through with no task per event."""
    if len(choices) == 1:
        events, event = choices[0]
        yield 0, event
        while not _last(event):
            event = await anext(events)
            yield 0, event
        return
    waiting: dict[asyncio.Future[E], int] = {}
    try:
        for index, (events, first) in enumerate(choices):
            yield index, first
            if not _last(first):
                waiting[asyncio.ensure_future(anext(events))] = index
        while waiting:
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for future in sorted(done, key=waiting.__getitem__):
                index = waiting.pop(future)
                event = future.result()
                yield index, event
                if not _last(event):
                    waiting[asyncio.ensure_future(anext(choices[index][0]))] = index
    finally:
        for future in waiting:
            future.cancel()
