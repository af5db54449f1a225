"""Idle slots' KV in host RAM (server/engine/ram_cache.py, `prompt_cache_ram_mb`)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from conftest import RunningServer, start_server, stop_server
from helpers import metric_value

from server.demo_model import DemoModelPaths
from server.engine.jobs import Slot
from server.engine.ram_cache import MIN_ENTRIES, RamPrefixCache


def chat(server: RunningServer, content: str, max_tokens: int,
         history: list[dict] | None = None) -> dict:
    messages = [*(history or []), {"role": "user", "content": content}]
    resp = httpx.post(f"{server.api}/chat/completions", timeout=60, json={
        "messages": messages, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True})
    assert resp.status_code == 200, resp.text
    return resp.json()


def ram_bytes(server: RunningServer) -> float:
    return metric_value(server.url, "vlserve_prompt_cache_ram_bytes")


def test_a_conversation_comes_back_from_ram_after_its_slot_was_taken(
        server: RunningServer) -> None:
    """Two slots, three conversations: A's slot goes to another conversation, yet A's next
    turn finds its prefix, copied back from RAM. (Kept in the KV cache instead, A's cache,
    the shorter, is the one the third conversation would overwrite.)"""
    a = "Tell me a short story about a lighthouse keeper and the ships at night."
    first = chat(server, a, 4)
    chat(server, "Describe, in many words and at great length, the ocean floor, the fish, "
         "the light that reaches it, the old wrecks and the currents around them.", 8)
    chat(server, "Name a colour that is neither red nor blue, and say why you chose it.", 4)
    assert ram_bytes(server) > 0
    second = chat(server, "Go on.", 2, history=[
        {"role": "user", "content": a},
        {"role": "assistant", "content": first["choices"][0]["message"]["content"]}])
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= first["usage"]["prompt_tokens"], (cached, first["usage"])


def test_a_regenerated_answer_does_not_copy_its_conversation_out() -> None:
    """Replacing only the end of a slot's sequence (an edited or regenerated last message)
    keeps the slot's prefix where it is: a copy of the whole sequence would stall every
    stream for what re-reading a few tokens costs later."""
    slot = Slot(0, cached=list(range(400)))
    assert not RamPrefixCache.worth_saving(slot, 390)  # 10 of 400 lost
    assert not RamPrefixCache.worth_saving(slot, 320)  # a fifth
    assert RamPrefixCache.worth_saving(slot, 300)  # a quarter
    assert RamPrefixCache.worth_saving(slot, 0)  # another conversation takes the slot
    short = Slot(1, cached=list(range(MIN_ENTRIES + 2)))
    assert not RamPrefixCache.worth_saving(short, 3)  # under MIN_ENTRIES lost


@pytest.fixture(scope="module")
def small_kv(demo_model: DemoModelPaths, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[RunningServer]:
    """Two slots sharing 512 KV cells: one long prompt needs the other slot's cells."""
    running = start_server(demo_model, tmp_path_factory.mktemp("small-kv") / "server.log",
                           "--n-parallel", "2", "--n-ctx", "512")
    yield running
    stop_server(running)


def test_a_conversation_dropped_for_room_comes_back_from_ram(small_kv: RunningServer) -> None:
    """An idle conversation whose cells a long prompt needs leaves the KV cache through the
    RAM cache, not into nothing: its next turn finds its prefix."""
    a = "Tell me a short story about a lighthouse keeper and the ships at night."
    first = chat(small_kv, a, 4)
    long_prompt = " ".join(f"word{i}" for i in range(150))
    big = chat(small_kv, long_prompt, 2)
    assert big["usage"]["prompt_tokens"] + first["usage"]["total_tokens"] > 512  # no room
    second = chat(small_kv, "Go on.", 2, history=[
        {"role": "user", "content": a},
        {"role": "assistant", "content": first["choices"][0]["message"]["content"]}])
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= first["usage"]["prompt_tokens"], (cached, first["usage"])
