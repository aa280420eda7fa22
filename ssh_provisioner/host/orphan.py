"""The orphan clock: when a kernel nobody attends to is ended."""

from typing import List, Optional


class OrphanClock:
    """When a kernel nobody attends to is ended.  Pure: the time is passed in.

    The client is gone when its channel reaches EOF (``left``), or when it has sent
    nothing for ``liveness`` seconds (0: silence never counts).  ``orphan`` seconds
    after that the kernel gets SIGTERM, and SIGKILL ``grace`` seconds later.  A client
    that speaks again after a silence stops the countdown (it was slow, not gone),
    unless SIGTERM went out; one that reattaches always stops it."""

    GONE, TERMINATE, KILL = "gone", "terminate", "kill"

    def __init__(self, liveness: float, orphan: float, grace: float, now: float) -> None:
        self.liveness, self.orphan, self.grace = liveness, orphan, grace
        self.last_heard = now
        self.orphan_deadline: Optional[float] = None
        self.terminated_at: Optional[float] = None
        self.silent = False  # the countdown runs because the client fell silent
        self.killed = False  # SIGKILL went out: nothing is due any more

    def _listening(self) -> bool:
        waiting = self.orphan_deadline is None and self.terminated_at is None
        return bool(self.liveness) and waiting and not self.killed

    def heard(self, now: float) -> None:
        self.last_heard = now
        if self.silent and self.terminated_at is None:
            self.orphan_deadline, self.silent = None, False

    def left(self, now: float) -> None:
        self.orphan_deadline = now + self.orphan
        self.silent = False

    def attached(self, now: float) -> None:
        self.orphan_deadline = self.terminated_at = None
        self.last_heard, self.silent = now, False

    def due(self, now: float) -> List[str]:
        """What is due at ``now``, in order; each action is reported once."""
        actions: List[str] = []
        if self.killed:
            return actions
        if self._listening() and now >= self.last_heard + self.liveness:
            actions.append(self.GONE)
            self.orphan_deadline, self.silent = now + self.orphan, True
        if self.orphan_deadline is not None and now >= self.orphan_deadline:
            actions.append(self.TERMINATE)
            self.orphan_deadline, self.terminated_at = None, now
        if self.terminated_at is not None and now >= self.terminated_at + self.grace:
            actions.append(self.KILL)
            self.terminated_at, self.killed = None, True
        return actions

    def next_wakeup(self, now: float) -> Optional[float]:
        """Seconds until something may be due, or None: nothing until an event."""
        times: List[float] = []
        if self.killed:
            return None
        if self.orphan_deadline is not None:
            times.append(self.orphan_deadline)
        if self._listening():
            times.append(self.last_heard + self.liveness)
        if self.terminated_at is not None:
            times.append(self.terminated_at + self.grace)
        return min(times) - now if times else None
