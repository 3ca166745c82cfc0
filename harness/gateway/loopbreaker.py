"""Retry-loop breaker: after K identical denied requests from one sandbox within T seconds,
the gateway answers saying the block is permanent, so an agent stops burning tokens on it.

How it answers once tripped (`answer`):
  "429"           Too Many Requests + the explanation. HTTP-correct, the default; but a client
                  that retries every non-2xx at once (a mechanical retry wrapper) keeps looping.
  "200-terminal"  200 + the same explanation: the pattern agent tool runtimes use so the retry
                  wrapper stops and the model reads the reason. Opt-in, because a client that
                  trusts any 2xx body takes the explanation as the content it asked for.
A CONNECT always gets 429: a 200 to CONNECT would mean "tunnel open", not "here is a reason".
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from enum import Enum

# Bounds memory when a sandbox sprays distinct denied URLs.
MAX_TRACKED_KEYS = 10_000

LoopKey = tuple[str, ...]

ANSWER_429 = "429"
ANSWER_200_TERMINAL = "200-terminal"
LOOP_ANSWERS = (ANSWER_429, ANSWER_200_TERMINAL)
DEFAULT_LOOP_ANSWER = ANSWER_429


def check_loop_answer(answer: str) -> str:
    if answer not in LOOP_ANSWERS:
        raise ValueError(f"loop_breaker answer must be one of {LOOP_ANSWERS}, got {answer!r}")
    return answer


def resolve_answer(*choices: str | None) -> str:
    """The first answer style set, most specific first (run time, GatewayConfig, policy)."""
    return next((c for c in choices if c is not None), DEFAULT_LOOP_ANSWER)


class LoopVerdict(Enum):
    UNDER = "under"  # answer with the normal deny
    TRIPPED = "tripped"  # first time over the threshold: loop answer + retry_loop_detected event
    LOOPING = "looping"  # still looping: the loop answer again


class LoopBreaker:
    def __init__(self, threshold: int, window_s: float, enabled: bool = True, answer: str | None = None) -> None:
        self.threshold = threshold
        self.window_s = window_s
        self.enabled = enabled and threshold > 0
        # None: whatever the gateway was configured with (GatewayConfig, else the policy); only
        # read once a loop has tripped, so the per-request path never looks at it.
        self.answer = None if answer is None else check_loop_answer(answer)
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
