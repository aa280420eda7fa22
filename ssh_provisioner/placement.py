"""Placement state shared by every kernel of a server process: who runs where, which
hosts are cooling down after a failure, probe results, rotation counters.

One ``PlacementState`` per process (the engine's), guarded by one lock:
filtering, ranking and reserving a host happen atomically, so concurrent starts never
double-book a host's ``max_kernels`` and a rotation never hands two starts one turn.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .errors import HostSelectionError, SSHConnectError
from .hosts import HostEntry
from .policies import HostPolicy, Placement
from .status import board

log = logging.getLogger(__name__)

# Runs a probe command on a host; returns its output, or None if it failed (never raises).
Prober = Callable[[HostEntry, str], Coroutine[Any, Any, str | None]]
T = TypeVar("T")


def candidates(
    entries: list[HostEntry],
    pinned: str | None,
    labels: frozenset[str],
    *,
    allow_any_host: bool,
    parse: Callable[[str], HostEntry],
) -> list[HostEntry]:
    """The configured hosts a start may use, after KERNEL_SSH_HOST / _LABELS (``parse``
    makes an entry of a pinned host that is not configured, if ``allow_any_host``)."""
    if not entries and not pinned:
        raise HostSelectionError("no hosts configured: set the 'hosts' option")
    chosen = entries
    if pinned:
        chosen = [entry for entry in entries if entry.matches(pinned)]
        if not chosen:
            if not allow_any_host:
                names = ", ".join(entry.name for entry in entries)
                raise HostSelectionError(
                    f"KERNEL_SSH_HOST={pinned!r} is not one of the configured hosts "
                    f"({names}); an admin can set allow_any_host to permit any host"
                )
            chosen = [parse(pinned)]
    if labels:
        labelled = [entry for entry in chosen if labels <= entry.labels]
        if not labelled:
            raise HostSelectionError(
                f"no host has the labels {sorted(labels)} (KERNEL_SSH_LABELS); hosts: "
                + ", ".join(f"{e.name} {sorted(e.labels)}" for e in chosen)
            )
        chosen = labelled
    return chosen


@dataclass
class PlacementRequest:
    """One start's constraints; ``exclude`` grows with every host that failed it."""

    candidates: list[HostEntry]
    policy: HostPolicy
    prefer: HostEntry | None = None
    exclude: set[str] = field(default_factory=set)


class PlacementState:
    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self._kernels: Counter[str] = Counter()
        self._unhealthy: dict[str, tuple[float, str]] = {}
        self._turns: Counter[tuple[str, ...]] = Counter()
        self._probes: dict[tuple[str, str], tuple[float, asyncio.Task[str | None]]] = {}

    # -- what policies see ------------------------------------------------------------

    def kernels(self, entry: HostEntry) -> int:
        return self._kernels[entry.name]

    def next_turn(self, entries: Sequence[HostEntry]) -> int:
        key = tuple(entry.name for entry in entries)
        turn = self._turns[key]
        self._turns[key] += 1
        return turn

    # -- health ----------------------------------------------------------------------

    def mark_unhealthy(self, entry: HostEntry, reason: str, cooldown: float) -> None:
        self._unhealthy[entry.name] = (time.monotonic() + cooldown, reason)
        log.warning("host %s is unhealthy for %gs: %s", entry.name, cooldown, reason)

    def unhealthy_reason(self, entry: HostEntry) -> str | None:
        record = self._unhealthy.get(entry.name)
        if record is None:
            return None
        until, reason = record
        if time.monotonic() >= until:
            del self._unhealthy[entry.name]
            return None
        return reason

    # -- probes ----------------------------------------------------------------------

    async def probe_all(
        self, entries: Sequence[HostEntry], command: str, prober: Prober, ttl: float
    ) -> dict[str, str | None]:
        """Probe output per host, cached for ``ttl`` seconds, one probe in flight per host."""
        now = time.monotonic()
        tasks: dict[str, asyncio.Task[str | None]] = {}
        for entry in entries:
            key = (entry.name, command)
            cached = self._probes.get(key)
            if cached is None or now - cached[0] > ttl:
                cached = self._probes[key] = (now, asyncio.create_task(prober(entry, command)))
            tasks[entry.name] = cached[1]
        # shielded: a cancelled start must not cancel a probe other starts wait for
        results = await asyncio.gather(*(asyncio.shield(t) for t in tasks.values()))
        return dict(zip(tasks, results, strict=True))

    # -- choosing ---------------------------------------------------------------------

    async def choose(
        self, request: PlacementRequest, prober: Prober, probe_ttl: float
    ) -> tuple[Placement | None, list[tuple[str, str]]]:
        """Pick and reserve a host; otherwise None and why each host was skipped."""
        usable = [e for e in request.candidates if e.name not in request.exclude]
        probes: dict[str, str | None] = {}
        command = request.policy.probe_command
        if command and usable:
            probes = await self.probe_all(usable, command, prober, probe_ttl)
        async with self.lock:
            skipped: list[tuple[str, str]] = []
            eligible, cooling = [], []
            for entry in usable:
                limit = entry.max_kernels
                if limit is not None and self._kernels[entry.name] >= limit:
                    skipped.append((entry.name, f"full ({limit} kernels, max_kernels)"))
                elif (reason := self.unhealthy_reason(entry)) is not None:
                    cooling.append((entry, reason))
                else:
                    eligible.append(entry)
            if not eligible and cooling:
                # Cooling down steers kernels to other hosts; with none left, try anyway
                # (the user may just have fixed the host).
                eligible = [entry for entry, _ in cooling]
            else:
                skipped += [(entry.name, reason) for entry, reason in cooling]
            preferred = request.prefer
            if preferred is not None and any(e.name == preferred.name for e in eligible):
                placement: Placement | None = Placement(preferred)
            else:
                if preferred is not None:
                    log.warning(
                        "host %s cannot take the kernel back; placing it elsewhere", preferred.name
                    )
                view = _View(self, probes)
                ranked = request.policy.rank(eligible, view) if eligible else []
                placement = ranked[0] if ranked else None
                ranked_names = {p.entry.name for p in ranked}
                for entry in eligible:
                    if entry.name not in ranked_names:
                        skipped.append((entry.name, f"ruled out by policy {request.policy.name}"))
            if placement is not None:
                self._kernels[placement.entry.name] += 1
            return placement, skipped

    def adopt(self, entry: HostEntry) -> None:
        """Count a kernel placed elsewhere (reattached from another process) on ``entry``."""
        self._kernels[entry.name] += 1

    def release(self, entry: HostEntry) -> None:
        """The kernel placed on ``entry`` is gone (or never started)."""
        if self._kernels[entry.name] > 0:
            self._kernels[entry.name] -= 1


@dataclass
class _View:
    state: PlacementState
    probes: dict[str, str | None]

    def kernels(self, entry: HostEntry) -> int:
        return self.state.kernels(entry)

    def probe(self, entry: HostEntry) -> str | None:
        return self.probes.get(entry.name)

    def next_turn(self, entries: Sequence[HostEntry]) -> int:
        return self.state.next_turn(entries)


@dataclass(frozen=True)
class Tries:
    """How one start goes through the hosts: ``attempts`` hosts at most, each one that
    cannot be reached passed over for ``cooldown`` seconds."""

    kernel_id: str
    attempts: int
    cooldown: float
    prober: Prober
    probe_ttl: float


async def start_with_failover(
    state: PlacementState,
    request: PlacementRequest,
    tries: Tries,
    start: Callable[[Placement], Awaitable[T]],
) -> tuple[T, Placement]:
    """(engine loop) Place the kernel and ``start`` it there; a host that cannot be
    reached (SSHConnectError) is marked unhealthy and the next choice is tried.  The
    error names every host tried and why, or the one host's own error."""
    previous = request.prefer
    failures: list[tuple[str, SSHConnectError]] = []
    skipped: list[tuple[str, str]] = []
    for _ in range(max(1, tries.attempts)):
        placement, skipped = await state.choose(request, tries.prober, tries.probe_ttl)
        if placement is None:
            break
        entry = placement.entry
        started = time.perf_counter()
        try:
            result = await start(placement)
        except SSHConnectError as exc:
            state.release(entry)
            state.mark_unhealthy(entry, str(exc), tries.cooldown)
            failures.append((entry.name, exc))
            failover = {"from": entry.name, "why": str(exc), "count": len(failures)}
            board.post(tries.kernel_id, failover=failover)
            request.exclude.add(entry.name)
            request.prefer = None
            continue
        except BaseException:
            state.release(entry)
            raise
        if previous is not None and previous.name != entry.name:
            log.warning(
                "kernel %s: restarted on %s, its host %s could not take it back",
                tries.kernel_id, entry.name, previous.name,
            )  # fmt: skip
        log.info(
            "kernel %s placed on %s in %.0f ms",
            tries.kernel_id, entry.name, (time.perf_counter() - started) * 1000,
        )  # fmt: skip
        return result, placement
    if len(failures) == 1 and not skipped:
        raise failures[0][1]  # one host, one cause: its own precise error
    lines = [f"  {name}: {exc}" for name, exc in failures]
    lines += [f"  {name}: skipped, {reason}" for name, reason in skipped]
    error = HostSelectionError(
        f"kernel {tries.kernel_id}: no host could take it (policy {request.policy.name}):\n"
        + "\n".join(lines or ["  (no candidate hosts)"])
    )
    if failures:
        raise error from failures[-1][1]
    raise error
