"""Whether a process still runs, and since when: the questions the worker pool,
the temporary area and the instance index ask about PIDs."""

from __future__ import annotations

import os

#: What :func:`start_time` returns where the system cannot tell (no ``/proc``).
UNKNOWN_START = -1


def start_time(pid: int) -> int | None:
    """Start time (clock ticks since boot) of a running `pid`; None if it is
    not running (a zombie, dead but not yet reaped, does not count);
    :data:`UNKNOWN_START` if it runs but this system cannot tell since when.

    >>> start_time(os.getpid()) is not None
    True
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return UNKNOWN_START
        return UNKNOWN_START
    fields = data.rpartition(b")")[2].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def pid_alive(pid: int) -> bool:
    """True if `pid` runs (a zombie does not count).

    >>> pid_alive(os.getpid())
    True
    """
    return start_time(pid) is not None
