"""Round trips to a host, one debug line each, named by why they are made.

Over a wide-area link what a user waits for is round trips, not CPU: a warm start
costs whatever the spec's and each stream's round trips add to the kernel's own start.
Each place that waits for the host's answer says so here (the logger
``ssh_provisioner.trips``), so ``benchmarks/wan.py`` counts them per operation and a
user can see, with debug logging on, where a slow start's time goes.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def trip(host: object, why: str, detail: str = "") -> None:
    """One round trip to ``host``, waited for because of ``why`` (the counted name;
    ``detail`` says which one, a stream's channel for instance)."""
    log.debug("round trip to %s: %s %s", host, why, detail)
