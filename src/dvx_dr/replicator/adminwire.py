"""The admin socket's wire format: JSON lines over a Unix socket (mode 0600).

``dvx-dr`` commands reach a running site through it (``cli.remote`` is the client,
``replicator.admin`` the site's side). One request per connection:

- **Request**: one line, a JSON object ``{"v": 1, "call": CALL, "params": {...}}``. ``CALL`` is
  ``status``, ``metrics`` (Prometheus text), ``reload``, ``replicate`` (params: ``snapshot``
  or ``volume``, ``to``, ``group``), or ``op``: a named store operation of ``site.ops``
  (params: ``{"name": OPERATION, "params": {...}}``).
- **Answer**: lines, each a JSON object. ``replicate`` first sends ``{"snapshot_created":
  SPEC}`` (with ``volume``) and ``{"progress": STATS}`` lines while the transfer runs. Every
  call ends with exactly one final line, ``{"result": VALUE}`` or ``{"error": MESSAGE,
  "exit_code": N}`` (the code the command exits with: 2 bad input, 3 integrity, 4 transient,
  5 protocol, 1 internal). The site then closes the connection.
- **Streamed reads**: ``read`` (params: ``volume`` or ``snapshot``, optional ``offset`` and
  ``length``, default the whole volume or snapshot) answers with the bytes in order, in
  pieces: ``{"bytes": N}`` followed on the wire by exactly N raw bytes (not JSON), or
  ``{"zeros": N}``, a run of N zero bytes (a hole; nothing follows it). Then the final line:
  ``{"result": {"size": SIZE, "length": LENGTH}}``, or an error line (also after some
  pieces: the data is then incomplete, and the command keeps none of it). ``volume read``,
  ``volume export`` and their ``snapshot`` forms use it, so any length streams in bounded
  memory and the command, not the site, writes the output. A snapshot is read in turns,
  with the site's other work in between; a live volume is read as of one instant, holding
  the site's store, so the site gives the read up when a slow command keeps other work
  waiting (see ``admin._read``).
- **A command's end of the connection**: a command sends nothing after its request line and
  keeps its end open until it has the final line. The site takes the end of its input (the
  command closed the connection, or shut down its sending side) as the command gone: a
  ``replicate`` transfer and a ``volume.import`` then stop (an import is dropped, as at
  Ctrl-C offline); other calls run to their end.

A request line is at most ``MAX_REQUEST`` bytes: a ``volume write`` sent through the site carries
its data inline (base64, at most ``site.ops.MAX_INLINE`` bytes of data).

Why not HTTP: the command that sends one request and reads a few lines is the latency of every
``replicate``, ``status`` and store command routed to a running site. The standard library's
HTTP client imports ``email`` and ``ssl`` (about 20 ms on this project's machine, a third of
such a command's start-up); this format needs only ``socket`` and ``json`` at the client, and
it is the local-control pattern of QEMU's QMP and systemd's Varlink.
"""

from __future__ import annotations

import json

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing is not loaded at run time: the client's start-up (cli.replicate)
    from typing import Any

VERSION = 1
#: Twice ``site.ops.MAX_INLINE`` (base64 grows data by a third), so any inline write fits.
MAX_REQUEST = 512 * 1024 * 1024
CALLS = ("status", "metrics", "reload", "replicate", "op", "read")
#: The largest piece of a streamed ``read`` (``{"bytes": N}``) a client accepts.
MAX_PIECE = 256 * 1024 * 1024


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def request(call: str, params: dict[str, Any] | None = None) -> bytes:
    return encode({"v": VERSION, "call": call, "params": params or {}})
