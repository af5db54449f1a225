"""The server process as the kernel sees it: resident memory and open file descriptors.

Read from /proc (Linux), so the soak must run on the server's machine; the process is
given by pid or found as the one listening on the URL's port.
"""

from __future__ import annotations

import os
from pathlib import Path

PROC = Path("/proc")


def rss_bytes(pid: int) -> int:
    """Resident set size (VmRSS)."""
    for line in (PROC / str(pid) / "status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no VmRSS for process {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(PROC / str(pid) / "fd"))


def listening_pid(port: int) -> int | None:
    """The process with a listening TCP socket on `port`, if this user can see it."""
    inodes = _listening_inodes(port)
    if not inodes:
        return None
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    return int(entry.name)
        except OSError:  # gone, or not ours to look at
            continue
    return None


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(inode)
    return inodes
