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
