"""Keeping processes that hold the password or the keys out of core dumps.

A core dump of a site holds everything in its memory: the keys it unwrapped, and a password
sent to it (``datastore unlock``, ``change-password``). ``forbid_core_dumps`` sets the core
size limit to 0 and makes the process not dumpable (``prctl(PR_SET_DUMPABLE, 0)``), which
also stops a ``core_pattern`` pipe (systemd-coredump, apport) from receiving a dump and closes
``/proc/PID/mem`` to other processes of the same user. ``site serve`` calls it first thing, and
so does every command that reads a password.
"""

from __future__ import annotations

import contextlib
import resource

PR_SET_DUMPABLE = 4


def forbid_core_dumps() -> None:
    import ctypes  # here: most commands never hold a password

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the limit alone
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)

