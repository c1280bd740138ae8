"""A process's memory as Linux reports it, for the benchmarks that measure it."""

from __future__ import annotations


def status_bytes(field: str, pid: int | str = "self") -> int:
    """Field ``field`` of /proc/<pid>/status in bytes (VmRSS: resident now; VmHWM: its
    peak). Raises KeyError when the file has no such field."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)
