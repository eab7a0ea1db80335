"""Reading JSON lines from a child's stdout with a deadline, without threads."""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
from collections.abc import Callable
from typing import Any


class JsonLines:
    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.proc = proc
        self.fd = proc.stdout.fileno()
        self.buffer = b""
        self.seen: list[dict[str, Any]] = []

    def next(self, timeout_s: float) -> dict[str, Any] | None:
        """The next JSON line; None at EOF; TimeoutError past the deadline."""
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no line from pid {self.proc.pid} in {timeout_s} s")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    return None
                self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        event: dict[str, Any] = json.loads(line)
        self.seen.append(event)
        return event

    def wait_for(self, name: str, timeout_s: float) -> dict[str, Any]:
        """Skip lines until one whose ``event`` is ``name``."""
        deadline = time.monotonic() + timeout_s
        while True:
            event = self.next(max(0.0, deadline - time.monotonic()))
            if event is None:
                raise EOFError(
                    f"pid {self.proc.pid} ended before {name!r}: {self.seen}"
                )
            if event.get("event") == name:
                return event
            if event.get("event") == "error":
                raise RuntimeError(f"pid {self.proc.pid} failed: {event}")


def collect_until(
    readers: list[JsonLines], done: Callable[[], bool], timeout_s: float
) -> bool:
    """Read lines from every reader into ``.seen`` until ``done()`` or the deadline.

    True when ``done()`` held in time.
    """
    deadline = time.monotonic() + timeout_s
    by_fd = {r.fd: r for r in readers}
    for reader in readers:  # lines already buffered by an earlier read
        _split(reader)
    while not done():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        ready, _, _ = select.select(list(by_fd), [], [], min(left, 0.5))
        for fd in ready:
            reader = by_fd[fd]
            chunk = os.read(fd, 65536)
            if not chunk:
                del by_fd[fd]
                continue
            reader.buffer += chunk
            _split(reader)
    return True


def _split(reader: JsonLines) -> None:
    while b"\n" in reader.buffer:
        line, reader.buffer = reader.buffer.split(b"\n", 1)
        reader.seen.append(json.loads(line))
