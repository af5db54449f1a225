"""`vlserve serve` with faults planted, for tests/test_faults.py only (never shipped).

The server is the real one; environment variables plant the faults that no request can
cause on its own, so that the paths that answer them can be tested for real:

- VLSERVE_TEST_FAULT_ENCODE_HASH: the vision encoder fails on the image with this content hash
  (llama.cpp's mtmd_encode_chunk returning non-zero, as on a GPU out of memory).
- VLSERVE_TEST_FAULT_CRASH_ON: the engine loop raises once a request with this X-Request-ID is
  in a slot and another request waits in the queue (a bug in the engine thread).
- VLSERVE_TEST_FAULT_HOLD_LOAD: loading the model waits until this file exists (a big model
  still loading), so a client can meet the real server while it loads.
- VLSERVE_TEST_FAULT_STALL_ON: the decode step never returns once a request with this
  X-Request-ID is in a slot (a wedged GPU driver); the watchdog must notice.
- VLSERVE_TEST_FAULT_DISK_FULL: while a file at this path exists, the disk under batch_dir has
  as many bytes free as the file says (none when it is empty): writes there use them up,
  and the one that runs out puts down what fits, then fails with ENOSPC, as a real disk
  fills partway through a file.
"""

from __future__ import annotations

import errno
import os
import sys
import threading
from pathlib import Path
from typing import Any


def plant_faults() -> None:
    from server.engine import mtmd
    from server.engine.scheduler import Scheduler

    bad_hash = os.environ.get("VLSERVE_TEST_FAULT_ENCODE_HASH")
    if bad_hash:
        encode = mtmd.encode_image

        def failing_encode(mctx: int, chunk: mtmd.PromptChunk) -> Any:
            if chunk.image is not None and chunk.image.content_hash.split("@")[0] == bad_hash:
                raise mtmd.MediaError("the vision encoder failed on an image")
            return encode(mctx, chunk)

        mtmd.encode_image = failing_encode

    crash_on = os.environ.get("VLSERVE_TEST_FAULT_CRASH_ON")
    if crash_on:
        step = Scheduler._step

        def crashing_step(self: Scheduler) -> None:
            running = {s.job.request.request_id for s in self.slots if s.job is not None}
            if crash_on in running and self.queue_depth > 0:
                raise RuntimeError("planted fault: the engine loop crashed")
            step(self)

        Scheduler._step = crashing_step  # type: ignore[method-assign]

    hold_load = os.environ.get("VLSERVE_TEST_FAULT_HOLD_LOAD")
    if hold_load:
        import time

        from server.engine import engine

        load_model = engine.load_model

        def held_load(settings: Any) -> Any:
            while not Path(hold_load).exists():
                time.sleep(0.05)
            return load_model(settings)

        engine.load_model = held_load

    stall_on = os.environ.get("VLSERVE_TEST_FAULT_STALL_ON")
    if stall_on:
        plain_step = Scheduler._step

        def stalling_step(self: Scheduler) -> None:
            running = {s.job.request.request_id for s in self.slots if s.job is not None}
            if stall_on in running:
                self._batch.decode = lambda ctx: threading.Event().wait()  # type: ignore[method-assign]
            plain_step(self)

        Scheduler._step = stalling_step  # type: ignore[method-assign]

    disk_full = os.environ.get("VLSERVE_TEST_FAULT_DISK_FULL")
    if disk_full:
        fill_disk(Path(disk_full), Path(os.environ["VLSERVE_BATCH_DIR"]).resolve())


class _FullDisk:
    """A file opened for writing on a disk that is nearly full."""

    def __init__(self, handle: Any, free: Path) -> None:
        self._handle = handle
        self._free = free

    def write(self, data: bytes) -> int:
        room = int(self._free.read_text() or 0) if self._free.exists() else len(data)
        fits = data[:room]
        self._handle.write(fits)
        if self._free.exists():
            self._free.write_text(str(room - len(fits)))
        if len(fits) < len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return len(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.close()


def fill_disk(free: Path, folder: Path) -> None:
    real_open = Path.open

    def open_on_a_full_disk(self: Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = real_open(self, mode, *args, **kwargs)
        if ("w" in mode or "a" in mode) and self.resolve().is_relative_to(folder):
            return _FullDisk(handle, free)
        return handle

    Path.open = open_on_a_full_disk  # type: ignore[method-assign]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    plant_faults()
    from server.cli import main

    sys.exit(main())
