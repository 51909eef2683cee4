from __future__ import annotations

import sys

from dvx_dr.cli import run

sys.exit(run())
