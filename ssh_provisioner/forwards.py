"""The ports a kernel opens on its host (a dashboard), forwarded to this machine.

The launcher reports every TCP port the kernel's processes listen on (host/ports.py);
each one ``forward_ports`` allows gets a local listener on ``forward_bind``, with the
same number when it is free here, so that ``http://localhost:6006`` just works.  Its
connections are streams to the launcher's relay like the kernel's own channels
(tunnels.KernelPorts): held during a blip and resumed, and closed with the kernel.  On
a Slurm cluster the relay runs on the compute node, so a node's port is reached the same
way.  A line in the running cell's output says where each new forward is.

A forward is a local port like the kernel's own: another user of this machine can
connect to it as to a local kernel's ports or an ``ssh -L`` (docs/security.md).
"""

from __future__ import annotations

import importlib.util
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import ProvisionerConfigError, TunnelError
from .tunnels import KernelPorts

log = logging.getLogger(__name__)

PORT_RANGE = (1, 65535)


@dataclass(frozen=True)
class ForwardSettings:
    """``forward_ports`` and ``forward_bind``, checked."""

    ranges: tuple[tuple[int, int], ...] | None  # None: every port ("auto")
    bind: str = "127.0.0.1"
    proxy_base: str = ""  # Jupyter Server's base URL, when jupyter-server-proxy is there

    @classmethod
    def parse(cls, ports: Any, bind: str, proxy_base: str = "") -> ForwardSettings | None:
        """None for ``off``; a ProvisionerConfigError names what is wrong."""
        try:
            ipaddress.ip_address(bind)
        except ValueError:
            raise ProvisionerConfigError(
                f"forward_bind: {bind!r} is not an IP address of this machine"
            ) from None
        if isinstance(ports, str):
            if ports.lower() == "off":
                return None
            if ports.lower() == "auto":
                return cls(None, bind, proxy_base)
            raise ProvisionerConfigError(
                f"forward_ports: {ports!r}: say auto, off, or a list of ports and ranges"
            )
        return cls(tuple(_port_range(item) for item in ports), bind, proxy_base)

    def allows(self, port: int) -> bool:
        return self.ranges is None or any(low <= port <= high for low, high in self.ranges)


def _port_range(item: Any) -> tuple[int, int]:
    low = high = None
    if isinstance(item, int) and not isinstance(item, bool):
        low = high = item
    elif isinstance(item, str):
        first, _, last = item.partition("-")
        if first.strip().isdigit() and (not last or last.strip().isdigit()):
            low, high = int(first), int(last or first)
    if low is None or high is None or not PORT_RANGE[0] <= low <= high <= PORT_RANGE[1]:
        raise ProvisionerConfigError(
            f"forward_ports: {item!r} is not a port (1-65535) or a range like '8000-8100'"
        )
    return low, high


class PortForwards:
    """One kernel's forwards: ``update`` follows the launcher's reports, ``close`` ends
    them all (with the kernel).  ``table`` maps the host's port to the local one."""

    def __init__(
        self,
        ports: KernelPorts,
        settings: ForwardSettings,
        label: str,
        host_name: str,
        tell: Callable[[str], None],
    ) -> None:
        self._ports = ports
        self._settings = settings
        self._label = label  # "kernel K on HOST", for the log
        self._host_name = host_name
        self._tell = tell  # a line for the running cell's output
        self.table: dict[int, int] = {}

    async def update(self, listening: dict[int, str]) -> None:
        for port in sorted(set(self.table) - set(listening)):
            self._ports.unforward(channel_of(port))
            log.info("%s: port %d closed on the host; its forward too", self._label, port)
            del self.table[port]
        for port in sorted(set(listening) - set(self.table)):
            if not self._settings.allows(port):
                log.debug("%s: port %d not in forward_ports; not forwarded", self._label, port)
                continue
            try:
                local = await self._ports.forward(channel_of(port), self._settings.bind, port)
            except (OSError, TunnelError) as exc:
                log.warning("%s: cannot forward port %d: %s", self._label, port, exc)
                continue
            self.table[port] = local
            self._announce(port, local)

    def _announce(self, port: int, local: int) -> None:
        where = f"http://{self._shown_address()}:{local}"
        if local != port:
            log.warning(
                "%s: port %d forwarded to %s (%d is taken on this machine)",
                self._label, port, where, port,
            )  # fmt: skip
        else:
            log.info("%s: port %d forwarded to %s", self._label, port, where)
        text = f"port {port} on {self._host_name} is now at {where}"
        if local != port:
            text += f" ({port} is taken on this machine)"
        if self._settings.proxy_base:
            text += f", and through Jupyter at {self._settings.proxy_base}proxy/{local}/"
        self._tell(f"[ssh-provisioner] {text}\n")

    def links(self) -> dict[str, dict[str, str]]:
        """Each forwarded port's addresses here, for the status panel: direct, and
        through Jupyter when jupyter-server-proxy is there."""
        base = self._settings.proxy_base
        return {
            str(port): {
                "url": f"http://{self._shown_address()}:{local}/",
                "proxy": f"{base}proxy/{local}/" if base else "",
            }
            for port, local in sorted(self.table.items())
        }

    def _shown_address(self) -> str:
        bind = self._settings.bind
        if ipaddress.ip_address(bind).is_unspecified:
            return "127.0.0.1"
        return f"[{bind}]" if ":" in bind else bind

    def close(self) -> None:
        # every forwarded channel of the ports, also one whose forward() was cancelled
        # before it made the table: one session's forwards are the only ones there
        for channel in self._ports.forwarded:
            self._ports.unforward(channel)
        self.table.clear()


def jupyter_proxy_base(manager: Any) -> str:
    """Jupyter Server's base URL when jupyter-server-proxy is installed beside it (its
    ``/proxy/PORT/`` reaches a port of this machine), else "".  The KernelManager's
    parents lead to the ServerApp."""
    if importlib.util.find_spec("jupyter_server_proxy") is None:
        return ""
    node = manager
    for _ in range(4):
        node = getattr(node, "parent", None)
        if node is None:
            return ""
        base = getattr(node, "base_url", None)
        if isinstance(base, str) and hasattr(node, "web_app"):
            return base if base.endswith("/") else base + "/"
    return ""


def channel_of(port: int) -> str:
    """The relay's name for a stream to ``port`` on the host (host/relay.forwardable)."""
    return f"tcp:{port}"
