"""Idle slots' KV in host RAM (server/engine/ram_cache.py, `prompt_cache_ram_mb`)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import llama_cpp
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


def slot_cells(server: RunningServer) -> list[int]:
    return [s["n_past"] for s in httpx.get(f"{server.api}/slots", timeout=10).json()["slots"]]


def copies(server: RunningServer, when: str) -> float:
    return metric_value(server.url, "vlserve_prompt_cache_ram_copies_total", f'when="{when}"')


def wait_for_copies_ahead(server: RunningServer, before: float, timeout: float = 10.0) -> None:
    """Until the idle engine has copied (all its idle slots go in one run, 50 ms after the
    last request)."""
    deadline = time.monotonic() + timeout
    while copies(server, "ahead") <= before:
        assert time.monotonic() < deadline, "an idle engine copied nothing to RAM"
        time.sleep(0.05)
    time.sleep(0.2)  # the run's last copies


def test_an_idle_engine_copies_conversations_to_ram_and_the_next_request_starts_clear(
        server: RunningServer) -> None:
    """With nothing to do, the engine copies idle slots' sequences to RAM; the next request,
    however short, then starts with them out of the KV cache (its prompt's cells come first,
    every step attends over its own cells only), and the conversation continues from RAM."""
    a = "Describe a harbour at dawn, the boats, the gulls and the people on the quay."
    ahead = copies(server, "ahead")
    first = chat(server, a, 6)
    needed = copies(server, "needed")
    wait_for_copies_ahead(server, ahead)  # no request in between: the engine did it idle
    assert copies(server, "needed") == needed
    assert sum(1 for n in slot_cells(server) if n) >= 1
    chat(server, "Name a fruit that is yellow.", 2)  # far below SPILL_AFTER_TOKENS
    held = sorted(slot_cells(server))
    # The short request's slot alone holds a conversation (copies need MIN_ENTRIES).
    assert held[-1] > 0 and all(n < MIN_ENTRIES for n in held[:-1]), held
    second = chat(server, "And the light?", 2, history=[
        {"role": "user", "content": a},
        {"role": "assistant", "content": first["choices"][0]["message"]["content"]}])
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= first["usage"]["prompt_tokens"], (cached, first["usage"])


def fake_state_copies(monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    monkeypatch.setattr(llama_cpp, "llama_state_seq_get_size", lambda ctx, seq: size)
    monkeypatch.setattr(llama_cpp, "llama_state_seq_get_data",
                        lambda ctx, data, size, seq: size)


def test_a_copy_made_ahead_pushes_out_only_conversations_used_before_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Copies made while idle take room only from copies used before the slot's own
    conversation was: one copied out for want of cells after that must not be lost to a
    copy of one still in the KV cache. A copy needed now (the cells are wanted) takes the
    least recently used, whatever its age."""
    fake_state_copies(monkeypatch, 600)
    ram = RamPrefixCache(None, budget_bytes=1000)
    older = Slot(0, cached=list(range(MIN_ENTRIES)), idle_since=time.monotonic())
    assert ram.save_ahead(older) and ram.holds(older)
    ram.save(newer := Slot(1, cached=list(range(100, 100 + MIN_ENTRIES))))  # spilled now
    assert ram.holds(newer) and not ram.holds(older) and ram.bytes == 600
    assert not ram.save_ahead(older)  # it went idle before `newer` was copied out
    assert ram.holds(newer)
    later = Slot(2, cached=list(range(200, 200 + MIN_ENTRIES)), idle_since=time.monotonic())
    assert ram.save_ahead(later)  # used after `newer`'s copy: that one goes
    assert ram.holds(later) and not ram.holds(newer) and ram.bytes == 600


def test_a_longer_copy_of_a_conversation_replaces_its_shorter_ones(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Turn after turn a conversation is copied again, longer: its earlier copies are a
    prefix of the new one, which every request they would match matches as far."""
    fake_state_copies(monkeypatch, 100)
    ram = RamPrefixCache(None, budget_bytes=10_000)
    turn1 = list(range(MIN_ENTRIES))
    ram.save(Slot(0, cached=turn1))
    ram.save(Slot(1, cached=[*turn1, 1, 2, 3], tenant="other key"))  # not the same client
    ram.save(Slot(0, cached=[*turn1, 7, 8]))
    assert len(ram) == 2 and ram.bytes == 200  # the turn-1 copy went
    assert ram.holds(Slot(0, cached=turn1))  # in the longer one
    saved, matched = ram.best([*turn1, 7, 9], "")
    assert saved is not None and matched == MIN_ENTRIES + 1


def test_a_copy_of_more_holds_a_slot_and_is_not_copied_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A slot whose content starts a longer copy (an earlier turn of a conversation copied
    later) may go for free: a restore of the longer copy keeps what a request matches. So
    it is not copied again, which would also bring back the shorter copy the longer one
    replaced."""
    fake_state_copies(monkeypatch, 100)
    ram = RamPrefixCache(None, budget_bytes=10_000)
    turn1 = list(range(MIN_ENTRIES))
    ram.save(Slot(0, cached=[*turn1, 5, 6]))
    earlier = Slot(1, cached=turn1, idle_since=time.monotonic())
    assert ram.holds(earlier)
    assert ram.save_ahead(earlier) and len(ram) == 1 and ram.copies_ahead == 0
    assert not ram.holds(Slot(1, cached=turn1, tenant="other key"))  # never across keys
    assert not ram.holds(Slot(1, cached=[*turn1[:-1], 99]))  # not a prefix


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
