"""Crash injection for the resume tests: JAXLLM_BATCH_CRASH=<point> makes the job SIGKILL itself at that
point (e.g. `part-000002:mid` half-way through writing part 2), as a preempted VM would stop it.
Unset (always, outside tests) it costs one environment lookup per commit."""

from __future__ import annotations

import os
import signal


def crash_point(point: str) -> None:
    if os.environ.get("JAXLLM_BATCH_CRASH") == point:
        os.kill(os.getpid(), signal.SIGKILL)
