"""Decode memory is bounded before decoding: per image (413 naming the size) and in all.

The images are issue 21's: files of a few KB whose decode used to take about 1 GB each.
Peak memory is the server's own VmHWM (reset through /proc/PID/clear_refs before each step).
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, RunningServer, start_server, stop_server
from helpers import data_url, image_message
from PIL import Image

from server.demo_model import DemoModelPaths
from server.images.budget import DecodeBudget

MiB = 1024 * 1024
PER_IMAGE = 320 * MiB  # the defaults: image_decode_max_mb, image_decode_budget_mb
IN_FLIGHT = 640 * MiB


def webp_lossless() -> bytes:
    """2.6 KB; 16383 x 4096 pixels, which libwebp decodes through four 4-byte canvases."""
    return _save(Image.new("RGB", (16383, 4096)), "WEBP", lossless=True)


def gray16_png() -> bytes:
    """130 KB; 8192² 16-bit grey (it used to go through numpy floats: +1.2 GB)."""
    return _save(Image.new("I;16", (8192, 8192)), "PNG")


def rgba_png() -> bytes:
    """260 KB; 8192² RGBA (it used to be copied and flattened at full size: +835 MB)."""
    return _save(Image.new("RGBA", (8192, 8192), (10, 20, 30, 0)), "PNG")


def big_jpeg() -> bytes:
    """8192² baseline JPEG: decoded at 1/8 scale, so cheap; it must not be refused."""
    return _save(Image.new("RGB", (8192, 8192), (90, 120, 200)), "JPEG")


def _save(image: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


IMAGES: dict[str, tuple[Callable[[], bytes], str]] = {
    "webp-16383x4096": (webp_lossless, "image/webp"),
    "gray16-png-8192": (gray16_png, "image/png"),
    "rgba-png-8192": (rgba_png, "image/png"),
    "jpeg-8192": (big_jpeg, "image/jpeg"),
}
REFUSED = {"webp-16383x4096"}  # the others fit one decode's budget


# --- peak memory of the server process -------------------------------------------------
def _status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key} for {pid}")


def peak_growth(pid: int, action: Callable[[], None]) -> int:
    """Bytes the process's peak RSS rose above its RSS before `action`."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := current RSS
    before = _status(pid, "VmRSS:")
    action()
    return _status(pid, "VmHWM:") - before


# --- through the server ------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(demo_model: DemoModelPaths, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[RunningServer]:
    """The default settings, with glibc told to hand every block of 1 MiB or more back to
    the system when freed: otherwise one decode's freed memory stays in the process and
    hides the next decode's peak from VmHWM (the growth measured would be too small)."""
    running = start_server(demo_model, tmp_path_factory.mktemp("decode") / "server.log",
                           env={"MALLOC_MMAP_THRESHOLD_": str(MiB)})
    yield running
    stop_server(running)


def send(server: RunningServer, route: str, data: bytes, mime: str) -> httpx.Response:
    if route == "chat":
        body = {"messages": [image_message("What is it?", data_url(data, mime))],
                "max_tokens": 2}
        return httpx.post(f"{server.api}/chat/completions", json=body, timeout=120)
    return httpx.post(f"{server.api}/files", files={"file": ("x.img", data, mime)},
                      data={"purpose": "vision"}, timeout=120)


def check_answer(name: str, resp: httpx.Response) -> None:
    if name in REFUSED:
        assert resp.status_code == 413, resp.text
        error = resp.json()["error"]
        assert re.search(r"decoding this 16383x4096 WebP image would take about 1,0\d\d MiB "
                         r"of memory; the limit is 320 MiB", error["message"]), error
        assert error["code"] == "invalid_image"
    else:
        assert resp.status_code == 200, resp.text


@pytest.fixture(scope="module")
def payloads() -> dict[str, bytes]:
    return {name: make() for name, (make, _) in IMAGES.items()}


@pytest.mark.parametrize("route", ["chat", "upload"])
@pytest.mark.parametrize("name", list(IMAGES))
def test_one_decode_stays_within_its_budget(server: RunningServer, payloads: dict[str, bytes],
                                            name: str, route: str) -> None:
    answers: list[httpx.Response] = []
    growth = peak_growth(server.process.pid, lambda: answers.append(
        send(server, route, payloads[name], IMAGES[name][1])))
    check_answer(name, answers[0])
    assert growth < PER_IMAGE, f"{name} via {route}: peak RSS +{growth / MiB:.0f} MiB"
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


@pytest.mark.parametrize("route", ["chat", "upload"])
@pytest.mark.parametrize("name", sorted(set(IMAGES) - {"jpeg-8192"}))
def test_four_at_once_share_one_budget(server: RunningServer, payloads: dict[str, bytes],
                                       name: str, route: str) -> None:
    answers: list[httpx.Response] = []

    def four() -> None:
        threads = [threading.Thread(target=lambda: answers.append(
            send(server, route, payloads[name], IMAGES[name][1]))) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(180)

    growth = peak_growth(server.process.pid, four)
    assert len(answers) == 4
    for resp in answers:
        check_answer(name, resp)
    assert growth < IN_FLIGHT, f"4 x {name} via {route}: peak RSS +{growth / MiB:.0f} MiB"


# --- the estimates against real decodes ---------------------------------------------------
_MEASURE = textwrap.dedent("""
    import io, sys
    from pathlib import Path
    from PIL import Image
    from server.images import decode
    from server.images.limits import ImageLimits

    def status(key):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    data = sys.stdin.buffer.read()
    limits = ImageLimits(max_decode_bytes=1 << 40)
    plan = decode.plan_decode(data, int(sys.argv[1]), limits=limits)
    Path("/proc/self/clear_refs").write_text("5")
    before = status("VmRSS:")
    decode.decode_planned(plan)
    print(plan.cost.total, status("VmHWM:") - before)
""")


def _progressive_jpeg() -> bytes:
    return _save(Image.new("RGB", (8192, 6144)), "JPEG", progressive=True)


def _palette_with_transparency() -> bytes:
    return _save(Image.new("P", (8192, 8192)), "PNG", transparency=0)


def _rgba_reduced_by_two() -> bytes:
    """Reduced by 2, then resized: through a premultiplied copy of the reduced image."""
    return _save(Image.new("RGBA", (5000, 3000)), "PNG")


def _rgba_resized_whole() -> bytes:
    """Under twice the gap: resized whole, through a premultiplied full-size copy."""
    return _save(Image.new("RGBA", (3000, 3000)), "WEBP", lossless=True)


# 1024: configs/default.yaml's cap; 112: what the LLaVA demo's projector takes (the server
# tests above), where the resize costs little and the estimate must still cover the peak.
@pytest.mark.parametrize("make, side", [
    (webp_lossless, 1024), (gray16_png, 1024), (rgba_png, 1024), (big_jpeg, 1024),
    (_progressive_jpeg, 1024), (_palette_with_transparency, 1024),
    (gray16_png, 112), (rgba_png, 112), (big_jpeg, 112),
    (_rgba_reduced_by_two, 1024), (_rgba_resized_whole, 1024),
], ids=lambda v: v if isinstance(v, int) else v.__name__.strip("_"))
def test_estimate_covers_the_measured_peak_and_is_not_wildly_above(
        make: Callable[[], bytes], side: int) -> None:
    """In a fresh process, so nothing else moves the peak."""
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(side)], input=make(), cwd=ROOT,
                          capture_output=True, timeout=300, check=True,
                          env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MiB)})
    estimate, measured = (int(x) for x in done.stdout.split())
    assert measured <= estimate, (measured / MiB, estimate / MiB)
    assert estimate <= measured * 1.25 + 40 * MiB, (measured / MiB, estimate / MiB)


# --- the shared budget -------------------------------------------------------------------
def test_budget_makes_decodes_wait_their_turn_and_counts_running_threads() -> None:
    async def scenario() -> list[str]:
        budget = DecodeBudget(100)
        order: list[str] = []
        gate = threading.Event()

        def work(name: str, wait: bool = False) -> Callable[[], str]:
            def run() -> str:
                if wait:
                    gate.wait(10)
                order.append(name)
                return name
            return run

        first = asyncio.create_task(budget.run(60, work("first", wait=True)))
        await asyncio.sleep(0.05)
        assert budget.in_use == 60
        second = asyncio.create_task(budget.run(60, work("second")))
        third = asyncio.create_task(budget.run(30, work("third")))  # fits, but queued behind
        await asyncio.sleep(0.05)
        assert budget.waiting == 2 and order == []
        first.cancel()  # the request went away; its thread still holds the memory
        await asyncio.sleep(0.05)
        assert budget.in_use == 60 and budget.waiting == 2
        gate.set()
        assert await second == "second" and await third == "third"
        assert budget.in_use == 0
        huge = await budget.run(10_000, work("huge"))  # capped at the whole budget: runs
        return [*order, huge]

    order = asyncio.run(scenario())
    assert order[0] == "first" and set(order[1:3]) == {"second", "third"}
    assert order[3:] == ["huge", "huge"]


def test_settings_refuse_a_per_image_limit_over_the_shared_budget() -> None:
    from server.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match="image_decode_max_mb"):
        load_settings(None, image_decode_max_mb=512, image_decode_budget_mb=256)


def test_a_decode_cancelled_while_waiting_leaves_the_queue_and_lets_the_next_one_in() -> None:
    async def scenario() -> tuple[str, int]:
        budget = DecodeBudget(100)
        gate = threading.Event()
        running = asyncio.create_task(budget.run(50, lambda: gate.wait(10)))
        await asyncio.sleep(0.05)
        big = asyncio.create_task(budget.run(80, lambda: "big"))  # does not fit yet
        small = asyncio.create_task(budget.run(40, lambda: "small"))  # fits, but queued
        await asyncio.sleep(0.05)
        assert budget.waiting == 2
        big.cancel()  # its client went away before its turn
        result = await asyncio.wait_for(small, 5)  # now at the head, and it fits
        gate.set()
        await running
        return result, budget.in_use

    assert asyncio.run(scenario()) == ("small", 0)
