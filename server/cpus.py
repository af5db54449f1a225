"""How many CPU cores this process may use, for llama.cpp's default thread count.

Not os.cpu_count(): it counts the whole machine. Inside a container limited with `--cpus`
(a cgroup CPU quota) or pinned to some cores (an affinity mask: taskset, docker
`--cpuset-cpus`, Kubernetes' static CPU manager) a thread per machine core oversubscribes
what the process gets, and llama.cpp's threads meet at a barrier after every operation:
each waits a scheduler slice for the others at every step (README: 2000 tokens in 36-66 s
instead of 0.8 s on a loaded 2-core box). loky, joblib's process pool, reads all of these
(cgroup v1 and v2 quotas, the affinity mask, LOKY_MAX_CPU_COUNT as an override).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from loky import cpu_count


@dataclass(frozen=True)
class Cores:
    machine: int  # logical CPUs of the machine (os.cpu_count())
    usable: int  # what this process may run on at once: quota and affinity applied

    def describe(self) -> str:
        if self.usable == self.machine:
            return f"{self.usable} cores"
        return (f"{self.usable} usable cores of the machine's {self.machine} (CPU quota or "
                "affinity)")


def usable_cores() -> Cores:
    return Cores(os.cpu_count() or 1, cpu_count())


def default_threads(cores: int) -> int:
    """One core left free: llama.cpp's threads meet at a barrier after every operation, so a
    core taken by anything else (our own image decoding and HTTP work included) stalls them
    all. Gemma 3 270M on 2 cores: 57 tok/s with 2 threads and 32 with 1 when alone, but 22
    with 2 and 44 with 1 beside one busy process (README, CPU threads)."""
    return max(1, cores - 1)


def oversubscribed(n_threads: int, cores: Cores) -> str | None:
    """Why `n_threads` is too many for these cores, or None."""
    if n_threads <= cores.usable:
        return None
    return (f"n_threads is {n_threads} but this process may use {cores.usable} core(s) "
            f"({cores.describe()}): llama.cpp's threads wait for each other after every "
            "operation, so each one without a core of its own stalls them all; set n_threads "
            f"to at most {cores.usable} (0 picks {default_threads(cores.usable)})")
