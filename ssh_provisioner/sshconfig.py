"""What the user's ssh config says about one host, read the way asyncssh reads it.

Two things are taken from it before connecting:

- host-key checking: ``UserKnownHostsFile none`` turns checking off in asyncssh, and
  ``UserKnownHostsFile /dev/null`` or ``StrictHostKeyChecking no`` say the user means
  to connect unchecked.  Each is refused, naming the file and line, unless an admin set
  ``allow_unchecked_host_keys``;
- ``ProxyJump``: the hops are opened here, with the same connect options as the host
  (asyncssh would open them with none of them: no known_hosts, keys or keepalives).
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from asyncssh.config import ConfigParseError, SSHClientConfig, SSHConfig

from .errors import HostKeyError, ProvisionerConfigError
from .hosts import Host

ALLOW_UNCHECKED = "allow_unchecked_host_keys"  # the admin option's name, everywhere
WATCHED = ("UserKnownHostsFile", "GlobalKnownHostsFile", "StrictHostKeyChecking", "ProxyJump")
UNCHECKED_FILES = {"none", "/dev/null"}
UNCHECKED_STRICTNESS = {"no", "off", "false"}


def _recording(handler: Callable[..., None]) -> Callable[..., None]:
    def record(config: _OriginConfig, name: str, args: list[str]) -> None:
        if name not in config.origins:  # the first value wins, as in OpenSSH
            config.origins[name] = f"{config._path} line {config._line_no}"
        handler(config, name, args)

    return record


class _OriginConfig(SSHClientConfig):
    """asyncssh's own config reader that also remembers where each watched option was
    set, and reads StrictHostKeyChecking (which asyncssh ignores)."""

    _handlers: dict[str, tuple[str, Callable[..., None]]] = {  # noqa: RUF012
        **SSHClientConfig._handlers,
        "stricthostkeychecking": ("StrictHostKeyChecking", SSHConfig._set_string),
    }

    def __init__(self, *args: Any) -> None:
        self.origins: dict[str, str] = {}
        super().__init__(*args)


_OriginConfig._handlers.update(
    {name.lower(): (name, _recording(_OriginConfig._handlers[name.lower()][1])) for name in WATCHED}
)


@dataclass(frozen=True)
class HostConfig:
    """The watched options' values for one host, and where each was set."""

    values: dict[str, Any] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)

    def line(self, option: str) -> str:
        value = self.values[option]
        shown = " ".join(value) if isinstance(value, list) else str(value)
        return f"'{option} {shown or 'none'}' ({self.origins.get(option, 'ssh config')})"

    @property
    def proxy_jump(self) -> str | None:
        jump = self.values.get("ProxyJump")
        return None if not jump or str(jump).lower() == "none" else str(jump)


def config_paths(options: dict[str, Any]) -> list[Path]:
    """The config files asyncssh reads for these connect options."""
    config = options.get("config", ())
    if config == ():
        default = Path("~", ".ssh", "config").expanduser()
        return [default] if os.access(default, os.R_OK) else []
    if not config:
        return []
    items = [config] if isinstance(config, str | os.PathLike) else list(config)
    return [Path(item).expanduser() for item in items]


def read_host_config(host: Host, options: dict[str, Any]) -> HostConfig:
    """(blocking: reads files) The watched options for ``host``."""
    paths = config_paths(options)
    if not paths:
        return HostConfig()
    user: Any = options.get("username", host.user if host.user is not None else ())
    port: Any = options.get("port", host.port if host.port is not None else ())
    try:
        local_user = getpass.getuser()
    except (KeyError, OSError):
        local_user = "nobody"
    try:
        config = _OriginConfig.load(
            None, paths, False, False, False, local_user, user, host.hostname, port
        )
    except (ConfigParseError, OSError) as exc:
        raise ProvisionerConfigError(f"ssh config for {host}: {exc}") from exc
    config = cast(_OriginConfig, config)
    values = {name: config.get(name) for name in WATCHED if config.get(name) is not None}
    return HostConfig(values, dict(config.origins))


def check_host_key_checking(
    host: Host, options: dict[str, Any], config: HostConfig, *, allow_unchecked: bool
) -> dict[str, Any]:
    """The connect options with host-key checking as the ssh config leaves it (and
    ``unchecked(options)`` tells whether that is none at all).

    Refuses (HostKeyError) a config that turns checking off or means to, unless
    ``allow_unchecked``; then checking is off (``known_hosts=None``) for this host."""
    if "known_hosts" in options:
        if options["known_hosts"] is None and not allow_unchecked:
            raise HostKeyError(
                f"SSH to {host}: connect option known_hosts=null turns host-key checking "
                f"off; ssh-provisioner does not connect to a host it cannot verify unless "
                f"an admin sets {ALLOW_UNCHECKED} = true",
                host=str(host),
            )
        weakening: list[str] = []  # explicit connect options win over the ssh config
    else:
        weakening = [
            name
            for name in ("UserKnownHostsFile", "GlobalKnownHostsFile")
            if name in config.values
            and (
                not config.values[name]
                or all(str(item).lower() in UNCHECKED_FILES for item in config.values[name])
            )
        ]
        # GlobalKnownHostsFile alone weakens nothing while a user file is read.
        if weakening == ["GlobalKnownHostsFile"]:
            weakening = []
    strictness = str(config.values.get("StrictHostKeyChecking", "")).lower()
    if strictness in UNCHECKED_STRICTNESS:
        weakening.append("StrictHostKeyChecking")
    if not weakening:
        return options
    if allow_unchecked:
        return {**options, "known_hosts": None}
    lines = " and ".join(config.line(name) for name in weakening)
    raise HostKeyError(
        f"SSH to {host}: your ssh config turns host-key checking off for this host with "
        f"{lines}; ssh-provisioner does not connect to a host it cannot verify. Remove "
        f"the line for this host (and add its key to known_hosts), or, as an admin who "
        f"accepts the risk, set {ALLOW_UNCHECKED} = true in the provisioner's config",
        host=str(host),
    )


def unchecked(options: dict[str, Any]) -> bool:
    """Whether connecting with these (checked) options verifies no host key."""
    return "known_hosts" in options and options["known_hosts"] is None


def jump_hosts(jump: str) -> list[Host]:
    """``ProxyJump`` hops, first to last: ``[user@]host[:port]``, comma-separated."""
    hops = []
    for item in jump.split(","):
        item = item.strip().removeprefix("ssh://")
        try:
            hops.append(Host.parse(item))
        except ProvisionerConfigError as exc:
            raise ProvisionerConfigError(f"ProxyJump {jump!r}: {exc}") from exc
    return hops
