"""glibc's allocator thresholds for store processes (``site.malloc``)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.conftest import cli_env

PROBE = """
import os, resource, sys
from dvx_dr.site import malloc
if sys.argv[1] == "tuned":
    assert malloc.tune()
data = os.urandom(16 << 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    blocks = [data[i:i + 65536] for i in range(0, len(data), 65536)]  # an import's blocks
    batches = [data[:4 << 20] + b"x" for _ in range(4)]  # a receiver's batches
    del blocks, batches
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> int:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(PROBE), mode],
                          capture_output=True, text=True, env=cli_env(), timeout=60,
                          check=True)
    return int(proc.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_allocator_reuses_freed_buffers_instead_of_faulting_them_in_again() -> None:
    """Freed block and batch buffers are reused: with glibc's defaults each round of
    allocations faults its memory in again (the heap's top is given back, and buffers of
    128 KiB and more are mappings of their own)."""
    default, tuned = page_faults("default"), page_faults("tuned")
    assert tuned * 3 < default, (default, tuned)

