"""File descriptors: the gateway's soft limit raised to the hard one, and shared so that no sandbox
can starve another.

Every proxied connection costs the gateway a descriptor for the sandbox's side and one for each
upstream connection it opens. At a desktop's default soft limit of 1024, idle tunnels of three
sandboxes under their per-sandbox cap of 256 ran the process out, and a fourth sandbox got 502 or
no answer at all. So the soft limit is raised to the hard one at start, and what is left after a
reserve is a budget: each sandbox is guaranteed a share of it, and the rest is a pool any sandbox
may borrow from until it is empty.
"""

from __future__ import annotations

import logging
import resource
from pathlib import Path

log = logging.getLogger(__name__)

FD_RESERVE = 64
"""Descriptors kept out of the budget for what is not a sandbox connection: the control socket and
its clients, the log and audit files, the CA's scratch files, getaddrinfo's sockets, and the
answer (503) to a connection that is over budget."""
FDS_PER_SANDBOX = 4
"""A sandbox's descriptors beside its connections: its listener, its DNS sockets (UDP, TCP), one spare."""
GUARANTEED_FDS_PER_SANDBOX = 64
"""Descriptors each sandbox gets whatever the others do (32 proxied connections), while the budget
allows; past that a sandbox borrows from the shared pool."""
NR_OPEN = Path("/proc/sys/fs/nr_open")
"""The kernel's ceiling on a process's descriptors, which caps an 'unlimited' hard limit."""


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            target = int(NR_OPEN.read_text())
        except (OSError, ValueError):
            target = soft
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError) as exc:
            log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, target, exc)
    return soft


class FdBudget:
    """Descriptors for sandbox connections, shared fairly.

    Each sandbox may always hold `guarantee` descriptors; past that it borrows from the pool (the
    budget less every sandbox's guarantee) while the pool lasts. Whatever one sandbox does, the
    others keep their guarantee, so a sandbox that floods itself is the only one it slows down.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        """The soft descriptor limit the budget is cut from."""
        self._used: dict[str, int] = {}
        self._borrowed = 0
        self.guarantee = 0
        """Descriptors each sandbox is guaranteed, given how many sandboxes there are."""
        self.pool = 0
        """Descriptors beyond the guarantees, for any sandbox to borrow."""
        self._resize()

    @property
    def budget(self) -> int:
        """Descriptors for connections: the limit less the reserve and every sandbox's own."""
        return max(0, self.limit - FD_RESERVE - FDS_PER_SANDBOX * len(self._used))

    def add_sandbox(self, sandbox: str) -> None:
        self._used.setdefault(sandbox, 0)
        self._resize()

    def remove_sandbox(self, sandbox: str) -> None:
        self._used.pop(sandbox, None)
        self._resize()

    def _resize(self) -> None:
        count = max(1, len(self._used))
        self.guarantee = min(GUARANTEED_FDS_PER_SANDBOX, self.budget // count)
        self.pool = self.budget - self.guarantee * len(self._used)
        self._borrowed = sum(max(0, used - self.guarantee) for used in self._used.values())

    def take(self, sandbox: str) -> bool:
        """One descriptor for `sandbox`; False when it has used its guarantee and the pool is empty."""
        used = self._used.get(sandbox)
        if used is None:
            return False  # removed: its connections are being cancelled
        if used >= self.guarantee:
            if self._borrowed >= self.pool:
                return False
            self._borrowed += 1
        self._used[sandbox] = used + 1
        return True

    def give(self, sandbox: str) -> None:
        """Give back a descriptor `sandbox` took (a sandbox removed meanwhile gives back nothing)."""
        used = self._used.get(sandbox)
        if used is None or used == 0:
            return
        if used > self.guarantee:
            self._borrowed -= 1
        self._used[sandbox] = used - 1

    def snapshot(self) -> dict[str, int]:
        return {
            "fd_limit": self.limit,
            "fd_budget": self.budget,
            "fd_guarantee_per_sandbox": self.guarantee,
            "fd_pool": self.pool,
            "fd_borrowed": self._borrowed,
        }
