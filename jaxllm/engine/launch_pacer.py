"""LaunchPacer: when async scheduling should dispatch the next step.

Dispatched the moment step N is, step N+1 is fixed while N still has most of its time to run, so a
request that arrives during N can only join N+2: with overlap, every new request's first token waits
one whole step more than without it. The pacer holds N+1 back until just before N is expected to end
(its host work included): a request that arrives meanwhile wakes the engine thread and joins N+1, and
the device still finds N+1 queued when N finishes, so the overlap is kept.

A step's device time is learned per token bucket, from fetches that had to wait: the step ended when the
wait did, and it began when it was dispatched or when the step before it ended, whichever was later.
The dispatch is planned a margin ahead of the expected end, and the margin adapts: a held-back dispatch
whose predecessor was already done when fetched came too late (the device sat idle), which widens it
by 2 ms; every step that was not late narrows it by 0.5 %, so late dispatches stay a few in a hundred.
A wait shorter than the margin is not worth its risk: where steps are short beside the jitter of their
timing (a single stream on a small CPU, where a woken thread must also win a core back from the step's
own threads) the pacer mostly stands aside. An estimate that runs long heals the same way:
late dispatches widen the margin until the pacer stops holding back, and the next fetch measures again.
Offline use (LLM.generate) never waits: nobody arrives mid-step there.
"""

from __future__ import annotations

import time

_WAITED_S = 2e-4  # a fetch that waited less than this found its step already done
_SMOOTHING = 0.3  # weight of the newest measurement in the running estimates
_MIN_MARGIN_S = 1e-3
_MARGIN_DECAY = 0.995  # per step not found late
_MARGIN_STEP_S = 2e-3  # per late one


def _smoothed(old: float | None, new: float) -> float:
    return new if old is None else old + _SMOOTHING * (new - old)


class LaunchPacer:
    def __init__(self):
        self._device_s: dict[int, float] = {}  # token bucket -> expected device time of one step
        self._host_s: float | None = None  # expected host time from the start of step() to its dispatch
        self._last_end = 0.0  # when the last fetched step ended (or an upper bound on it)
        self._margin = 2 * _MIN_MARGIN_S
        self._held = False  # the dispatch now due was held back
        self.late = 0  # held-back dispatches that found the device idle

    def dispatched(self, host_s: float) -> None:
        """A step went to the device `host_s` after step() began."""
        self._host_s = _smoothed(self._host_s, host_s)

    def fetched(self, bucket: int, dispatched_at: float, waited_s: float, at: float) -> None:
        """A step of `bucket` tokens, dispatched at `dispatched_at`, has its results in at `at` after
        waiting `waited_s` for them."""
        began = max(dispatched_at, self._last_end)
        if waited_s >= _WAITED_S:
            self._device_s[bucket] = _smoothed(self._device_s.get(bucket), at - began)
            self._margin = max(_MIN_MARGIN_S, self._margin * _MARGIN_DECAY)
        elif self._held:
            self.late += 1
            self._margin += _MARGIN_STEP_S
        self._held = False
        self._last_end = at

    def delay(self, bucket: int, dispatched_at: float, now: float | None = None) -> float:
        """Seconds to hold the next dispatch back while a step of `bucket` tokens dispatched at
        `dispatched_at` runs: 0 for a bucket not measured yet."""
        expected = self._device_s.get(bucket)
        if expected is None:
            return 0.0
        now = time.perf_counter() if now is None else now
        wait = max(dispatched_at, self._last_end) + expected - now - (self._host_s or 0.0) - self._margin
        self._held = wait >= self._margin
        return wait if self._held else 0.0
