"""Retry-loop breaker: after K identical denied requests from one sandbox within T seconds,
the gateway answers 429 saying the block is permanent, so an agent stops burning tokens on it.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from enum import Enum

# Bounds memory when a sandbox sprays distinct denied URLs.
MAX_TRACKED_KEYS = 10_000

LoopKey = tuple[str, ...]


class LoopVerdict(Enum):
    UNDER = "under"  # answer with the normal deny
    TRIPPED = "tripped"  # first time over the threshold: 429 + retry_loop_detected event
    LOOPING = "looping"  # still looping: 429 again


class LoopBreaker:
    def __init__(self, threshold: int, window_s: float, enabled: bool = True) -> None:
        self.threshold = threshold
        self.window_s = window_s
        self.enabled = enabled and threshold > 0
        self._seen: OrderedDict[LoopKey, deque[float]] = OrderedDict()
        self._tripped: set[LoopKey] = set()
        self.trips = 0

    def observe_denied(self, key: LoopKey, now: float | None = None) -> LoopVerdict:
        if not self.enabled:
            return LoopVerdict.UNDER
        now = time.monotonic() if now is None else now
        times = self._seen.get(key)
        if times is None:
            times = deque(maxlen=self.threshold + 1)
            self._seen[key] = times
            if len(self._seen) > MAX_TRACKED_KEYS:
                old, _ = self._seen.popitem(last=False)
                self._tripped.discard(old)
        else:
            self._seen.move_to_end(key)
        while times and now - times[0] > self.window_s:
            times.popleft()
        if not times:
            # A whole quiet window ends a loop: the next burst starts counting afresh.
            self._tripped.discard(key)
        times.append(now)
        if len(times) <= self.threshold:
            return LoopVerdict.UNDER
        if key in self._tripped:
            return LoopVerdict.LOOPING
        self._tripped.add(key)
        self.trips += 1
        return LoopVerdict.TRIPPED
