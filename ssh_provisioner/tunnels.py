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
    ) -> KernelTunnels:
        """Forward a fresh local port to each endpoint (a TCP port or a Unix socket path)."""
        tunnels = cls(host, {})
        try:
            for channel in CHANNELS:
                endpoint = endpoints[channel]
                if isinstance(endpoint, str):
                    listener = await connection.forward_local_port_to_path(
                        LOCAL_ADDRESS, 0, endpoint
                    )
                else:
                    listener = await connection.forward_local_port(
                        LOCAL_ADDRESS, 0, LOCAL_ADDRESS, endpoint
                    )
                tunnels._listeners[channel] = listener
        except (asyncssh.Error, OSError) as exc:
            await tunnels.aclose()
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
