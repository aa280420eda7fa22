"""SSH destinations: ``[user@]host[:port]``, ``[user@][v6addr]:port`` or a ssh-config alias."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .errors import ProvisionerConfigError

_HOSTNAME = re.compile(r"^[A-Za-z0-9_.\-%:]+$")


@dataclass(frozen=True)
class Host:
    """Where a kernel runs.  ``user`` and ``port`` left as None defer to ``~/.ssh/config``."""

    hostname: str
    user: str | None = None
    port: int | None = None

    @classmethod
    def parse(cls, destination: str) -> Host:
        text = destination.strip()
        if not text:
            raise ProvisionerConfigError("hosts: an entry is empty")
        user: str | None = None
        if "@" in text:
            user, _, text = text.rpartition("@")
            if not user:
                raise ProvisionerConfigError(f"hosts: {destination!r} has an empty user name")
        port_text: str | None = None
        if text.startswith("["):
            hostname, sep, rest = text[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise ProvisionerConfigError(f"hosts: {destination!r} is not [address]:port")
            port_text = rest[1:] if rest else None
        elif text.count(":") == 1:
            hostname, _, port_text = text.partition(":")
        else:
            hostname = text  # a name, or a bare IPv6 address
        if not hostname or not _HOSTNAME.match(hostname):
            raise ProvisionerConfigError(f"hosts: {destination!r} has an invalid host name")
        port: int | None = None
        if port_text is not None:
            if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                raise ProvisionerConfigError(
                    f"hosts: {destination!r} has an invalid port {port_text!r} (1-65535)"
                )
            port = int(port_text)
        return cls(hostname=hostname, user=user, port=port)

    def connect_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"host": self.hostname}
        if self.user is not None:
            kwargs["username"] = self.user
        if self.port is not None:
            kwargs["port"] = self.port
        return kwargs

    @property
    def known_hosts_name(self) -> str:
        """How known_hosts names this host: ``[name]:port`` unless the port is default."""
        if self.port is None or self.port == 22:
            return self.hostname
        return f"[{self.hostname}]:{self.port}"

    def __str__(self) -> str:
        name = f"[{self.hostname}]" if ":" in self.hostname and self.port else self.hostname
        text = f"{self.user}@{name}" if self.user else name
        return f"{text}:{self.port}" if self.port is not None else text


# Per-host settings a `hosts` entry may override, and the type each must have.
HOST_OVERRIDES: dict[str, tuple[type, ...]] = {
    "remote_python": (str,),
    "remote_cwd": (str,),
    "remote_transport": (str,),
    "remote_env": (dict,),
    "connect_options": (dict,),
    "kbdint": (list,),
    "use_control_master": (str,),
    "prespawn": (int,),
}
TRANSPORTS = ("tcp", "ipc")


@dataclass(frozen=True)
class HostEntry:
    """One item of ``hosts``: a destination, its placement limits and its overrides."""

    host: Host
    max_kernels: int | None = None
    labels: frozenset[str] = frozenset()
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        return str(self.host)

    def override(self, option: str, default: Any) -> Any:
        return dict(self.overrides).get(option, default)

    def matches(self, requested: str) -> bool:
        """Is ``requested`` (e.g. KERNEL_SSH_HOST) this entry? Its name or its host name."""
        return requested.strip() in (self.name, self.host.hostname)

    @classmethod
    def parse(cls, item: Any) -> HostEntry:
        if isinstance(item, str):
            return cls(Host.parse(item))
        if not isinstance(item, dict):
            raise ProvisionerConfigError(
                f"hosts: entry {item!r} must be a string or a dict, not {type(item).__name__}"
            )
        fields = dict(item)
        if "host" not in fields:
            raise ProvisionerConfigError(f"hosts: entry {item!r} has no 'host'")
        destination = fields.pop("host")
        if not isinstance(destination, str):
            raise ProvisionerConfigError(f"hosts: entry {item!r}: 'host' must be a string")
        host = Host.parse(destination)
        where = f"hosts: entry {destination!r}"
        max_kernels = fields.pop("max_kernels", None)
        if max_kernels is not None and (
            isinstance(max_kernels, bool) or not isinstance(max_kernels, int) or max_kernels < 1
        ):
            raise ProvisionerConfigError(f"{where}: max_kernels must be a positive integer")
        labels = fields.pop("labels", [])
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise ProvisionerConfigError(f"{where}: labels must be a list of strings")
        for option, value in fields.items():
            if option not in HOST_OVERRIDES:
                known = ", ".join(["host", "max_kernels", "labels", *HOST_OVERRIDES])
                raise ProvisionerConfigError(f"{where}: unknown key {option!r} (known: {known})")
            if not isinstance(value, HOST_OVERRIDES[option]):
                raise ProvisionerConfigError(
                    f"{where}: {option} must be a {HOST_OVERRIDES[option][0].__name__}"
                )
        prespawn = fields.get("prespawn", 0)
        if isinstance(prespawn, bool) or prespawn < 0:
            raise ProvisionerConfigError(f"{where}: prespawn must be an integer, 0 or more")
        if fields.get("remote_transport", "tcp") not in TRANSPORTS:
            raise ProvisionerConfigError(f"{where}: remote_transport must be tcp or ipc")
        return cls(host, max_kernels, frozenset(labels), tuple(sorted(fields.items())))
