"""Prometheus metrics for whoever runs the server, read off the status board.

Jupyter Server serves prometheus_client's default registry at ``/metrics``; the server
extension calls :func:`install` once, and from then on each change a kernel's owners
post to the board (status.py) counts here.  Names carry one prefix and follow
Prometheus' conventions (``_total`` counters, ``_seconds`` histograms, base units).
"""

from __future__ import annotations

import threading
import time
from collections import Counter as Tally
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .status import FAILED, RUNNING, StatusBoard, board, traffic

PREFIX = "ssh_provisioner"
# A start takes from a second (a warm spare) to an hour (a queued job).
START_BUCKETS = (0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 900, 1800, 3600, float("inf"))


class _Metrics:
    def __init__(self) -> None:
        self.starts = Histogram(
            f"{PREFIX}_start_seconds",
            "Kernel start to ready, by kind: cold (a new launcher), warm (a spare "
            "launcher was waiting), queued (a Slurm job that waited in the queue), "
            "restart (a kernel's next start, on its kept ports).",
            ["kind"],
            buckets=START_BUCKETS,
        )
        self.failed_starts = Counter(
            f"{PREFIX}_failed_starts_total", "Kernel starts that failed.", ["host"]
        )
        self.reconnects = Counter(
            f"{PREFIX}_reconnects_total", "Links lost and being retried, by host.", ["host"]
        )
        self.reattaches = Counter(
            f"{PREFIX}_reattaches_total", "Kernels reattached after a lost link.", ["host"]
        )
        self.failovers = Counter(
            f"{PREFIX}_failovers_total",
            "Starts that could not reach a host and went on to the next, by that host.",
            ["host"],
        )
        self.abandoned = Counter(
            f"{PREFIX}_abandoned_kernels_total",
            "Kernels given up as unreachable past reconnect_timeout.",
            ["host"],
        )

    def changed(self, kernel_id: str, before: dict[str, Any], after: dict[str, Any]) -> None:
        host = str((after.get("host") or {}).get("alias") or "")
        phase, was = after.get("phase"), before.get("phase")
        reattached = (after.get("link") or {}).get("reattached")
        if phase == RUNNING and was != RUNNING and "started" in after and not reattached:
            kind = str(after.get("start_kind") or "cold")
            self.starts.labels(kind).observe(max(0.0, time.time() - after["started"]))
        if phase == FAILED and was != FAILED:
            self.failed_starts.labels(host).inc()
        link, link_was = after.get("link") or {}, before.get("link") or {}
        if link.get("state") != link_was.get("state"):
            if link.get("state") == "down":
                self.reconnects.labels(host).inc()
            elif link.get("state") == "given-up":
                self.abandoned.labels(host).inc()
        failover, failover_was = after.get("failover") or {}, before.get("failover") or {}
        if failover.get("count") and failover.get("count") != failover_was.get("count"):
            self.failovers.labels(str(failover.get("from"))).inc()
        if link.get("reattached") and link.get("reattached") != link_was.get("reattached"):
            self.reattaches.labels(host).inc()


class _BoardCollector(Collector):
    """Gauges read at scrape time: the kernels by host and phase, the jobs by state."""

    def __init__(self, status: StatusBoard) -> None:
        self._board = status

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        _, entries = self._board.snapshot()
        live = [entry for entry in entries if not entry.get("gone")]
        kernels = GaugeMetricFamily(
            f"{PREFIX}_kernels", "Remote kernels by host and phase.", labels=["host", "phase"]
        )
        tally = Tally(
            (str((e.get("host") or {}).get("alias") or ""), str(e.get("phase"))) for e in live
        )
        for (host, phase), count in sorted(tally.items()):
            kernels.add_metric([host, phase], count)
        yield kernels
        jobs = GaugeMetricFamily(
            f"{PREFIX}_slurm_jobs", "Slurm jobs of remote kernels by state.", labels=["state"]
        )
        states = Tally(str(e["slurm"].get("state") or "SUBMITTED") for e in live if e.get("slurm"))
        for state, count in sorted(states.items()):
            jobs.add_metric([state], count)
        yield jobs
        relayed = CounterMetricFamily(
            f"{PREFIX}_relayed_bytes",
            "Bytes relayed between clients and remote kernels, by host and direction.",
            labels=["host", "direction"],
        )
        dropped = CounterMetricFamily(
            f"{PREFIX}_dropped_bytes",
            "IOPub bytes dropped while a kernel was unreachable (past outage_buffer).",
            labels=["host"],
        )
        for (host, kind), count in sorted(traffic.snapshot().items()):
            if kind == "dropped":
                dropped.add_metric([host], count)
            else:
                relayed.add_metric([host, kind], count)
        yield relayed
        yield dropped


_installed = threading.Lock()
_metrics: _Metrics | None = None


def install() -> None:
    """Register the metrics in prometheus_client's default registry (once)."""
    global _metrics
    with _installed:
        if _metrics is not None:
            return
        _metrics = _Metrics()
        REGISTRY.register(_BoardCollector(board))
        board.listen(_metrics.changed)
