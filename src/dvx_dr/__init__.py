"""dvx-dr: replication and disaster recovery for deduplicated, encrypted volume stores."""

from __future__ import annotations

__version__ = "0.1.0"
