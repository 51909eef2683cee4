"""Pre- and post-snapshot hooks of a protection group: a command with a timeout, run in a
process group of its own so that a timeout or a stopping site leaves nothing behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

from dvx_dr.errors import DvxError
from dvx_dr.policies.model import Hook


async def run_hook(pg: str, which: str, hook: Hook,
                   outcome: str = "snapshot not taken") -> None:
    argv = hook.argv()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True)  # its own process group, so a timeout kills all of it
    except OSError as exc:
        raise DvxError(f"group {pg}: {which} hook {argv[0]!r} cannot run: {exc.strerror}"
                       ) from None
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), hook.timeout)
    except (TimeoutError, asyncio.CancelledError) as exc:
        # Kill the whole group: a shell's children (`sh -c "sleep 10"`) hold the output pipe,
        # and waiting for them would hold the snapshot job (and the group's lock) past the
        # timeout, forever if the hook hangs. Cancelled (the site stops): leave nothing behind.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise DvxError(f"group {pg}: {which} hook timed out after {hook.timeout:g}s; "
                       f"{outcome}") from None
    if proc.returncode != 0:
        tail = out.decode(errors="replace").strip().splitlines()[-1:] if out else []
        raise DvxError(f"group {pg}: {which} hook exited {proc.returncode}"
                       + (f" ({tail[0]})" if tail else "") + f"; {outcome}")
