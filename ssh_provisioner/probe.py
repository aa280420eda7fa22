"""A policy's probe (load, GPU memory) or the doctor's, run on a host's connection."""

from __future__ import annotations

import asyncio
import logging

import asyncssh

from .errors import session_open_error
from .hosts import Host
from .link import SSHLink

log = logging.getLogger(__name__)


async def run_probe(connection: SSHLink, host: Host, command: str, timeout: float) -> str | None:
    """Output of ``command`` on the host, or None if it failed.  Raises only
    SessionLimitError: the connection is at its MaxSessions, another may do."""
    try:
        result = await asyncio.wait_for(connection.run(command), timeout)
    except asyncssh.ChannelOpenError as exc:
        raise session_open_error(str(host), "a policy probe", exc) from exc
    except (asyncssh.Error, OSError, TimeoutError) as exc:
        log.info("probe on %s failed: %s", host, exc)
        return None
    if result.exit_status != 0:
        log.debug("probe %r on %s: exit status %s", command, host, result.exit_status)
        return None
    return str(result.stdout or "")
