"""What the user's ssh config says about one host, read the way asyncssh reads it.

asyncssh reads the config twice: once for the name as given, then, when
``CanonicalizeHostname`` turned the name into a canonical one or the config has a
``Match final`` block, again with ``canonical``/``final`` on and the canonical name.
``resolve_host_config`` does the same passes (the canonical name looked up as asyncssh
looks it up), and what is taken from the last one is passed to asyncssh explicitly
(``known_hosts``, ``tunnel``), so nothing asyncssh reads afterwards can change it.

Two things are taken from it before connecting:

- host-key checking: ``UserKnownHostsFile none`` turns checking off in asyncssh, and
  ``UserKnownHostsFile /dev/null`` or ``StrictHostKeyChecking no`` say the user means
  to connect unchecked.  Each is refused, naming the file and line, unless an admin set
  ``allow_unchecked_host_keys``;
- ``ProxyJump``: the hops are opened here, with the same connect options as the host
  (asyncssh would open them with none of them: no known_hosts, keys or keepalives).
"""

from __future__ import annotations

import asyncio
import fnmatch
import getpass
import ipaddress
import os
import socket
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
    canonical_name: str | None = None  # what CanonicalizeHostname made of the name

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


CANONICAL_OPTIONS = {  # connect option: (ssh config option, default), as asyncssh has them
    "canonicalize_hostname": ("CanonicalizeHostname", False),
    "canonical_domains": ("CanonicalDomains", ()),
    "canonicalize_max_dots": ("CanonicalizeMaxDots", 1),
    "canonicalize_fallback_local": ("CanonicalizeFallbackLocal", True),
    "canonicalize_permitted_cnames": ("CanonicalizePermittedCNAMEs", ()),
}


async def resolve_host_config(host: Host, options: dict[str, Any]) -> HostConfig:
    """The watched options for ``host`` from the pass asyncssh ends with: the first
    read, then (after canonicalizing the name, or for ``Match final``) the second."""
    first, canonicalize, has_final = await asyncio.to_thread(_read, host, options, None, False)
    canonical = await _canonical_name(host.hostname, {**canonicalize, **_given(options)})
    if canonical is None and not has_final:
        return first
    final, _, _ = await asyncio.to_thread(_read, host, options, canonical, has_final)
    return HostConfig(final.values, final.origins, canonical)


def _given(options: dict[str, Any]) -> dict[str, Any]:
    return {name: options[name] for name in CANONICAL_OPTIONS if name in options}


async def _canonical_name(name: str, settings: dict[str, Any]) -> str | None:
    """The canonical name asyncssh will connect to, or None: each CanonicalDomains
    suffix is resolved in turn (AI_CANONNAME), a CNAME kept only where
    CanonicalizePermittedCNAMEs allows it."""
    domains = settings.get("canonical_domains") or ()
    if not settings.get("canonicalize_hostname") or not domains:
        return None
    if name.count(".") > int(settings.get("canonicalize_max_dots", 1)):
        return None
    try:
        ipaddress.ip_address(name)
        return None
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    for domain in domains:
        candidate = f"{name}.{domain}"
        try:
            found = await loop.getaddrinfo(candidate, 0, flags=socket.AI_CANONNAME)
        except (socket.gaierror, UnicodeError):
            continue
        cname = found[0][3]
        if cname and cname != candidate:
            for rule in settings.get("canonicalize_permitted_cnames") or ():
                sources, targets = rule.split(":", 1) if isinstance(rule, str) else rule
                if _matches(candidate, sources) and _matches(cname, targets):
                    return str(cname)
        return candidate
    return None  # asyncssh then resolves the name as given, or refuses it itself


def _matches(name: str, patterns: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in patterns.split(","))


def _read(
    host: Host, options: dict[str, Any], canonical: str | None, final: bool
) -> tuple[HostConfig, dict[str, Any], bool]:
    """(blocking) One pass over the config: the watched options, the canonicalization
    settings, and whether a ``Match final`` block asks for a last pass."""
    paths = config_paths(options)
    if not paths:
        return HostConfig(), {}, False
    user: Any = options.get("username", host.user if host.user is not None else ())
    port: Any = options.get("port", host.port if host.port is not None else ())
    try:
        local_user = getpass.getuser()
    except (KeyError, OSError):
        local_user = "nobody"
    name = canonical or host.hostname
    try:
        config = _OriginConfig.load(
            None, paths, canonical is not None, canonical is not None, final,
            local_user, user, name, port,
        )  # fmt: skip
    except (ConfigParseError, OSError) as exc:
        raise ProvisionerConfigError(f"ssh config for {host}: {exc}") from exc
    config = cast(_OriginConfig, config)
    values = {name: config.get(name) for name in WATCHED if config.get(name) is not None}
    canonicalize = {
        option: config.get(setting, default)
        for option, (setting, default) in CANONICAL_OPTIONS.items()
    }
    return HostConfig(values, dict(config.origins)), canonicalize, config.has_match_final()


def check_host_key_checking(
    host: Host, options: dict[str, Any], config: HostConfig, *, allow_unchecked: bool
) -> dict[str, Any]:
    """The connect options with host-key checking as the ssh config leaves it, with
    ``known_hosts`` always explicit (``unchecked(options)`` tells whether that is none
    at all): asyncssh then takes it as given, whatever its own passes over the config
    find.

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
        return {**options, "known_hosts": effective_known_hosts(options, config)}
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


def effective_known_hosts(options: dict[str, Any], config: HostConfig) -> Any:
    """The known_hosts asyncssh would use, as asyncssh derives it from the config:
    the user's files, then the global ones; ``[]`` means its default file."""
    if "known_hosts" in options:
        return options["known_hosts"]
    files = list(config.values.get("UserKnownHostsFile") or [])
    return files + list(config.values.get("GlobalKnownHostsFile") or [])


def known_hosts_sources(options: dict[str, Any]) -> str:
    """What a connection with these options checks the host key against, for people."""
    known_hosts = options.get("known_hosts")
    if known_hosts is None and "known_hosts" in options:
        return "nothing"
    if not known_hosts:
        return "~/.ssh/known_hosts"
    if isinstance(known_hosts, str | os.PathLike):
        return str(known_hosts)
    if isinstance(known_hosts, list | tuple) and all(
        isinstance(item, str | os.PathLike) for item in known_hosts
    ):
        return ", ".join(str(item) for item in known_hosts)
    return "the given known_hosts"


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
