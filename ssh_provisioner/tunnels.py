"""KernelTunnels: the five local forwards 127.0.0.1:<port> -> the kernel's endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncssh

from .errors import TunnelError
from .hosts import Host
from .launcher import CHANNELS

log = logging.getLogger(__name__)

LOCAL_ADDRESS = "127.0.0.1"


class KernelTunnels:
    """Owns the local listeners; ``aclose()`` stops them (idempotent)."""

    def __init__(self, host: Host, listeners: dict[str, asyncssh.SSHListener]) -> None:
        self.host = host
        self._listeners = listeners

    @classmethod
    async def open(
        cls,
        connection: asyncssh.SSHClientConnection,
        host: Host,
        endpoints: dict[str, int | str],
        *,
        preferred_ports: dict[str, int] | None = None,
    ) -> KernelTunnels:
        """Forward a local port to each endpoint (a TCP port or a Unix socket path).

        ``preferred_ports`` are the previous kernel's local ports: after a restart the
        clients already connected (Jupyter Server's channels among them) reconnect to
        the same ports, as they do with a local kernel.  Taken ports fall back to new ones.
        """
        tunnels = cls(host, {})
        try:
            for channel in CHANNELS:
                port = (preferred_ports or {}).get(channel, 0)
                try:
                    listener = await _forward(connection, port, endpoints[channel])
                except OSError as exc:
                    if not port:
                        raise
                    log.warning(
                        "on %s: local port %d is taken (%s); using a new one", host, port, exc
                    )
                    listener = await _forward(connection, 0, endpoints[channel])
                tunnels._listeners[channel] = listener
        except BaseException as exc:
            # cancelled half-way too: no listener outlives a failed open
            await asyncio.shield(tunnels.aclose())
            if not isinstance(exc, asyncssh.Error | OSError):
                raise
            raise TunnelError(
                f"on {host}: cannot forward a local port to the kernel's {channel} "
                f"endpoint {endpoints[channel]!r}: {exc}",
                host=str(host),
            ) from exc
        return tunnels

    @property
    def local_ports(self) -> dict[str, int]:
        return {channel: listener.get_port() for channel, listener in self._listeners.items()}

    async def aclose(self) -> None:
        listeners, self._listeners = self._listeners, {}
        for listener in listeners.values():
            listener.close()
        for listener in listeners.values():
            with contextlib.suppress(asyncssh.Error, OSError):
                await asyncio.wait_for(listener.wait_closed(), 5.0)


async def _forward(
    connection: asyncssh.SSHClientConnection, local_port: int, endpoint: int | str
) -> asyncssh.SSHListener:
    if isinstance(endpoint, str):
        return await connection.forward_local_port_to_path(LOCAL_ADDRESS, local_port, endpoint)
    return await connection.forward_local_port(LOCAL_ADDRESS, local_port, LOCAL_ADDRESS, endpoint)
