"""Is that process still the one we started? One answer for the whole package.

A pid alone is not an identity: after a crash or a reboot the number is reused. So
wherever gossipfl records a process to signal later (``gossipfl up``'s state file,
the lab's record), it records the pid *and* the kernel's start time of that
process (field 22 of ``/proc/<pid>/stat``, clock ticks since boot), and signals only
a process whose start time still matches. A zombie (exited, not yet reaped) counts
as gone.
"""

from __future__ import annotations


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name may hold spaces and parentheses; fields follow the last ")".
    return text[text.rindex(")") + 2:].split()


def start_time(pid: int) -> int | None:
    """The kernel start time of a live process; None if gone or a zombie."""
    fields = _stat_fields(pid)
    return None if fields is None or fields[0] == "Z" else int(fields[19])


def running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    return start_time(pid) is not None


def same_process(pid: int | None, started: int | None) -> bool:
    """True when ``pid`` is alive and is the process that started at ``started``."""
    if not pid or started is None:
        return False
    return start_time(pid) == started
