"""Opening one SSH link to a host: the user's OpenSSH master, or a connection of our own.

The user's ssh config is read as asyncssh reads it (sshconfig.py) before anything is
sent: a config that would switch host-key checking off is refused, ProxyJump hops are
opened here with the same options, and every failure leaves as our exception tree.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from typing import Any, cast

import asyncssh

from .errors import (
    AuthenticationError,
    ProvisionerConfigError,
    SSHConnectError,
    translate_connect_error,
)
from .hosts import Host
from .kbdint import AUTH_COOLDOWN, KBDINT, PromptAnswering, PromptRule, parse_rules
from .link import AsyncsshLink, SSHLink
from .master import USE_CONTROL_MASTER, locate, master_hint, mode_of, open_master
from .mux import MuxLink
from .sshconfig import (
    ALLOW_UNCHECKED,
    HostConfig,
    check_host_key_checking,
    jump_hosts,
    resolve_host_config,
)
from .trips import trip

log = logging.getLogger(__name__)

DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"
# OpenSSH sends two small packets after authentication (success, then its host-key
# announcement) and has no TCP_NODELAY until a session starts: each small packet waits
# (Nagle) for the ACK of the one before, and Linux delays ACKs by 40 ms. Measured: the
# first channel then opens in ~47 ms instead of ~2. So we ACK at once (TCP_QUICKACK)
# and open no channel before the announcement has arrived (1-3 ms); servers that send
# no announcement cost at most this long.
HOST_KEYS_ANNOUNCEMENT_WAIT = 0.05
MAX_JUMP_HOPS = 8
JUMP_DEPTH = "jump_depth"  # a private connect option: how deep in ProxyJump hops we are
# asyncssh's own list with AES-GCM first: every message of a kernel crosses asyncssh in
# this process, and measured per execute round trip AES-GCM costs 0.4 ms less than
# ChaCha20-Poly1305 (and streams 1.45x faster). All are secure; the server still decides
# what it accepts. connect_options.encryption_algs overrides.
PREFERRED_CIPHERS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
    "aes192-ctr",
    "aes256-ctr",
)


def check_connect_options(options: dict[str, Any], *, allow_unchecked: bool = False) -> None:
    """Refuse options that would silently weaken host-key checking."""
    if "known_hosts" in options and options["known_hosts"] is None and not allow_unchecked:
        raise ProvisionerConfigError(
            "connect_options: known_hosts=null would disable host-key checking, which "
            f"ssh-provisioner does not do unless an admin sets {ALLOW_UNCHECKED}; list "
            "a known_hosts file instead"
        )


async def connect(host: Host, options: dict[str, Any], *, connect_timeout: float) -> SSHLink:
    """Open a link to ``host``: through the user's running OpenSSH master if there is
    one (``use_control_master``), else a connection of our own.  Every failure is
    translated into our exception tree."""
    mode = mode_of(options)
    config = await resolve_host_config(host, asyncssh_options(options))
    check_host_key_checking(
        host, asyncssh_options(options), config, allow_unchecked=bool(options.get(ALLOW_UNCHECKED))
    )  # the master's connection was made with the same config: refused alike
    master = await open_master(host, asyncssh_options(options) | {USE_CONTROL_MASTER: mode})
    if master is not None:
        log.info("SSH to %s: through %s", host, master.description)
        return master
    try:
        connection = await _connect(host, options, connect_timeout=connect_timeout, config=config)
        return AsyncsshLink(connection)
    except AuthenticationError as exc:
        hint = "" if mode == "never" else await master_hint(host, asyncssh_options(options))
        if not hint:
            raise
        raise type(exc)(f"{exc}{hint}", host=str(host), prompted=exc.prompted) from exc


PRIVATE_OPTIONS = (ALLOW_UNCHECKED, KBDINT, AUTH_COOLDOWN, JUMP_DEPTH, USE_CONTROL_MASTER)


def asyncssh_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options asyncssh knows (ours are private: kbdint rules, modes, ...)."""
    return {name: value for name, value in options.items() if name not in PRIVATE_OPTIONS}


async def _connect(
    host: Host,
    options: dict[str, Any],
    *,
    connect_timeout: float,
    config: HostConfig | None = None,
) -> asyncssh.SSHClientConnection:
    """Open a connection of our own.

    The user's ssh config is read first (in a thread), unless ``config`` is what it
    says: a line that switches host-key checking off is refused, and ProxyJump hops are
    opened here with the same options."""
    allow_unchecked = bool(options.get(ALLOW_UNCHECKED, False))
    depth = int(options.get(JUMP_DEPTH, 0))
    kbdint = options.get(KBDINT)
    mode = mode_of(options)
    rules = parse_rules(kbdint)
    options = asyncssh_options(options)
    if config is None:
        config = await resolve_host_config(host, options)
    requested = options
    options = check_host_key_checking(host, options, config, allow_unchecked=allow_unchecked)
    hop: Via | None = None
    try:
        if config.proxy_jump and "tunnel" not in options and "sock" not in options:
            hop = await _open_jump_hosts(
                host, config, requested, allow_unchecked, kbdint, depth, connect_timeout, mode
            )
            options = {**options, **await _through(hop, host, requested)}
        connection = await _connect_direct(
            host, options, connect_timeout=connect_timeout, rules=rules
        )
    except BaseException:
        if hop is not None:
            hop.close()
        raise
    if hop is not None:
        connection.set_tunnel(cast(Any, hop))  # closed with the connection it carries
    return connection


Via = asyncssh.SSHClientConnection | MuxLink  # what a ProxyJump hop is reached through


async def _through(via: Via, host: Host, options: dict[str, Any]) -> dict[str, Any]:
    """The connect options that reach ``host`` through a hop: a tunnel over our own
    connection to it, or a stdio forward through the user's OpenSSH master for it."""
    if isinstance(via, asyncssh.SSHClientConnection):
        return {"tunnel": via}
    place = await locate(host, options)  # the master forwards to an address, not an alias
    return {"sock": await via.open_socket(place.hostname, place.port), "tunnel": None}


async def _open_jump_hosts(
    host: Host,
    config: HostConfig,
    options: dict[str, Any],
    allow_unchecked: bool,
    kbdint: Any,
    depth: int,
    connect_timeout: float,
    mode: str,
) -> Via:
    """Connect through each ProxyJump hop in turn, each with ``options`` (known_hosts,
    client keys, keepalives): the first reads its own ssh config, ProxyJump included
    (so hosts that jump through each other are a loop, caught by the depth).  A first
    hop with a running OpenSSH master (a bastion that asks for a second factor, say) is
    gone through with the master, as ``ssh`` does, per ``use_control_master``."""
    hops = jump_hosts(config.proxy_jump or "")
    if depth + len(hops) > MAX_JUMP_HOPS or str(host) in {str(hop) for hop in hops}:
        raise ProvisionerConfigError(
            f"ssh config for {host}: ProxyJump {config.proxy_jump!r} "
            f"({config.origins.get('ProxyJump', 'ssh config')}) loops or is too long"
        )
    # A bastion may ask for the second factor too: the host's kbdint rules answer it.
    hop_options = {
        **options,
        ALLOW_UNCHECKED: allow_unchecked,
        KBDINT: kbdint,
        JUMP_DEPTH: depth + len(hops),
        USE_CONTROL_MASTER: mode,
    }
    previous: Via | None = None
    connection: Via | None = None
    for hop in hops:
        try:
            if previous is None:
                connection = await open_master(hop, {**options, USE_CONTROL_MASTER: mode})
                if connection is None:
                    connection = await _connect(hop, hop_options, connect_timeout=connect_timeout)
            else:
                via = {**hop_options, **await _through(previous, hop, options)}
                connection = await _connect(hop, via, connect_timeout=connect_timeout)
                connection.set_tunnel(cast(Any, previous))
        except SSHConnectError as exc:
            if previous is not None:
                previous.close()
            error = type(exc)(
                f"{exc} (jump host on the way to {host}: ProxyJump {config.proxy_jump}, "
                f"{config.origins.get('ProxyJump', 'ssh config')})",
                host=str(host),
            )
            if isinstance(exc, AuthenticationError) and isinstance(error, AuthenticationError):
                error.prompted = exc.prompted  # a bastion's second factor counts alike
            raise error from exc
        except BaseException:
            if previous is not None:
                previous.close()
            raise
        previous = connection
    if connection is None:
        raise ProvisionerConfigError(f"ssh config for {host}: empty ProxyJump")
    return connection


async def _connect_direct(
    host: Host, options: dict[str, Any], *, connect_timeout: float, rules: list[PromptRule]
) -> asyncssh.SSHClientConnection:
    kwargs = {**options, **host.connect_kwargs()}
    prompts: PromptAnswering | None = None
    if "client_factory" not in options and "password" not in options:
        answering = prompts = PromptAnswering(str(host), rules)
        kwargs["client_factory"] = lambda: answering
    kwargs.setdefault("connect_timeout", connect_timeout)
    kwargs.setdefault("encryption_algs", list(PREFERRED_CIPHERS))
    announced = asyncio.Event()
    users_handler = options.get("server_host_keys_handler")

    def on_host_keys(*args: Any) -> None:
        announced.set()
        if users_handler is not None:
            users_handler(*args)

    kwargs["server_host_keys_handler"] = on_host_keys
    try:
        connection = await asyncio.wait_for(asyncssh.connect(**kwargs), connect_timeout + 1)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        if isinstance(exc, asyncssh.PermissionDenied) and prompts is not None:
            explained = prompts.explain(str(host))
            if explained is not None:
                raise explained from exc
        entries = None
        if isinstance(exc, asyncssh.HostKeyNotVerifiable):
            entries = await asyncio.to_thread(_count_known_keys, host, options)
        raise translate_connect_error(
            str(host), exc, known_host_entries=entries, known_hosts_name=host.known_hosts_name
        ) from exc
    trip(host, "ssh connection")  # its key exchange and authentication: SSH's own
    _acknowledge_now(connection)
    with contextlib.suppress(TimeoutError):
        if not announced.is_set():
            trip(host, "host-key announcement wait")
        await asyncio.wait_for(announced.wait(), HOST_KEYS_ANNOUNCEMENT_WAIT)
    _acknowledge_now(connection)
    return connection


def _acknowledge_now(connection: asyncssh.SSHClientConnection) -> None:
    sock = connection.get_extra_info("socket")
    quickack = getattr(socket, "TCP_QUICKACK", None)  # Linux only
    if sock is not None and quickack is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)


def _count_known_keys(host: Host, options: dict[str, Any]) -> int:
    """How many keys the client trusts for ``host``: tells 'unknown' from 'changed'."""
    known_hosts = options.get("known_hosts") or DEFAULT_KNOWN_HOSTS
    sources = known_hosts if isinstance(known_hosts, list | tuple) else [known_hosts]
    total = 0
    for source in sources:
        if isinstance(source, str):
            source = os.path.expanduser(source)
            if not os.path.exists(source):
                continue
        try:
            trusted, ca_keys, *_ = asyncssh.match_known_hosts(
                source, host.hostname, host.hostname, host.port
            )
        except (OSError, ValueError, asyncssh.Error):
            continue
        total += len(trusted) + len(ca_keys)
    return total
