"""One shared asyncssh connection per destination, per process (on the engine's loop).

Every kernel placed on a host leases the same connection: the launcher's session
channel, its control traffic and the five forwards are multiplexed over it.  A
connection whose last lease is released closes after an idle period; a closed or
dead connection is replaced on the next lease.  When the server refuses another
session on it (sshd's MaxSessions, 10 by default), the connection is marked full and
the next lease gets a second connection to the same destination.

A connection can also hold *spare processes*: a launcher exec'd ahead of time, past
the login shell and Python start-up, waiting for its spec.  They die with it.

A "connection" is an ``SSHLink``: our own asyncssh connection, or the user's OpenSSH
master for the host (``use_control_master``; see master.py), which the pool treats
alike: leased, idle-closed (we let go of the master, it stays up), replaced when lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import asyncssh

from .errors import (
    AuthenticationError,
    ProvisionerConfigError,
    SessionLimitError,
    SSHConnectError,
    TunnelError,
    translate_connect_error,
)
from .hosts import Host
from .kbdint import AUTH_COOLDOWN, KBDINT, PromptAnswering, PromptRule, parse_rules
from .link import AsyncsshLink, RemoteProcess, SSHLink
from .master import (
    USE_CONTROL_MASTER,
    locate,
    master_hint,
    master_running,
    mode_of,
    open_master,
)
from .mux import MuxLink
from .sshconfig import (
    ALLOW_UNCHECKED,
    HostConfig,
    check_host_key_checking,
    jump_hosts,
    resolve_host_config,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"
DEFAULT_IDLE_TIMEOUT = 60.0
# Connections one piece of work tries on a host: a pooled connection can be dead, or at
# sshd's MaxSessions, and concurrent starts can fill a fresh one before we use it.
CONNECTIONS_PER_ATTEMPT = 4
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


@dataclass
class _Entry:
    connection: SSHLink
    leases: int = 0
    idle_close: asyncio.TimerHandle | None = None
    spares: dict[str, RemoteProcess] = field(default_factory=dict)
    # Leases it held when the server last refused a session (sshd's MaxSessions): it
    # takes no more until one of them ends.  None: no refusal seen.
    lease_capacity: int | None = None

    @property
    def full(self) -> bool:
        return self.lease_capacity is not None and self.leases >= self.lease_capacity

    def close(self) -> None:
        if self.idle_close is not None:
            self.idle_close.cancel()
        for spare in self.spares.values():
            spare.close()
        self.spares.clear()
        self.connection.close()


SpareFactory = Callable[[SSHLink], Awaitable[RemoteProcess]]


@dataclass
class Lease:
    """A kernel's claim on a pooled connection; ``release()`` when the kernel is gone.

    The connection stays open ``idle_timeout`` seconds after its last lease ends."""

    pool: ConnectionPool
    key: str
    connection: SSHLink
    idle_timeout: float
    released: bool = field(default=False)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.pool._release(self.key, self.connection, self.idle_timeout)

    def mark_full(self) -> None:
        """The server refused this lease a session: the connection holds what its other
        leases hold, and the next lease goes to another connection until one ends."""
        entry = self.pool._entry(self.key, self.connection)
        if entry is not None and self.connection.holds_sessions:
            entry.lease_capacity = entry.leases - (0 if self.released else 1)
            log.info("SSH connection %s is at its session limit; the next opens another", self.key)

    def take_spare(self, name: str) -> RemoteProcess | None:
        """A live spare process made by ``prepare_spare``, or None."""
        entry = self.pool._entry(self.key, self.connection)
        if entry is None:
            return None
        spare = entry.spares.pop(name, None)
        if spare is not None and (spare.is_closing() or spare.exit_status is not None):
            spare.close()
            return None
        if spare is not None:
            self.connection.claim(spare)
        return spare

    def prepare_spare(self, name: str, factory: SpareFactory) -> None:
        """Start a spare in the background unless one is there; failures only cost speed."""
        self.pool._prepare_spare(self.key, self.connection, name, factory)


def check_connect_options(options: dict[str, Any], *, allow_unchecked: bool = False) -> None:
    """Refuse options that would silently weaken host-key checking."""
    if "known_hosts" in options and options["known_hosts"] is None and not allow_unchecked:
        raise ProvisionerConfigError(
            "connect_options: known_hosts=null would disable host-key checking, which "
            f"ssh-provisioner does not do unless an admin sets {ALLOW_UNCHECKED}; list "
            "a known_hosts file instead"
        )


Errand = Callable[[], Coroutine[Any, Any, None]]


class ConnectionPool:
    def __init__(self) -> None:
        self._errands: dict[str, list[Errand]] = {}
        self._errand_tasks: set[asyncio.Task[None]] = set()
        self._entries: dict[str, list[_Entry]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._preparing: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._refusals: dict[str, tuple[float, AuthenticationError]] = {}

    @staticmethod
    def key_for(host: Host, options: dict[str, Any]) -> str:
        return json.dumps([str(host), options], sort_keys=True, default=repr)

    async def lease(
        self,
        host: Host,
        options: dict[str, Any],
        *,
        connect_timeout: float,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    ) -> Lease:
        """Return a lease on a live connection to ``host``, connecting if needed.

        A host that refused our keyboard-interactive answers is not asked again (no
        new prompt, no push to the user's phone) for ``auth_cooldown`` seconds: the
        same error is raised at once."""
        check_connect_options(options, allow_unchecked=bool(options.get(ALLOW_UNCHECKED)))
        key = self.key_for(host, options)
        refusal = self._refusals.get(key)
        mode = mode_of(options)
        if refusal is not None and time.monotonic() < refusal[0]:
            # ... unless the user has opened an OpenSSH master since, as told to
            if not await master_running(host, _public(options) | {USE_CONTROL_MASTER: mode}):
                raise refusal[1]
            self._refusals.pop(key, None)
        async with self._locks.setdefault(key, asyncio.Lock()):
            entries = self._entries.setdefault(key, [])
            for lost in [entry for entry in entries if entry.connection.is_closed()]:
                log.info("SSH connection to %s was lost; reconnecting", host)
                entries.remove(lost)
                self._close_later(lost)
            entry = next((entry for entry in entries if not entry.full), None)
            if entry is None:
                try:
                    connection = await connect(host, options, connect_timeout=connect_timeout)
                except AuthenticationError as exc:
                    self._forget_if_empty(key, entries)
                    cooldown = float(options.get(AUTH_COOLDOWN, 0))
                    if (exc.prompted or options.get(KBDINT)) and cooldown > 0:
                        # a reconnect loop, a restarter, failover: none of them may
                        # prompt again (PAM faillock, fail2ban count each attempt)
                        self._refusals[key] = (time.monotonic() + cooldown, exc)
                        log.warning("%s; not asking %s again for %gs", exc, host, cooldown)
                    raise
                except BaseException:
                    self._forget_if_empty(key, entries)
                    raise
                if self._entries.get(key) is not entries:  # aclose() ran meanwhile
                    connection.close()
                    raise SSHConnectError(
                        f"SSH to {host}: the SSH engine closed while connecting", host=str(host)
                    )
                entry = _Entry(connection)
                entries.append(entry)
                self._run_errands(key)
            if entry.idle_close is not None:
                entry.idle_close.cancel()
                entry.idle_close = None
            entry.leases += 1
            return Lease(self, key, entry.connection, idle_timeout)

    def _forget_if_empty(self, key: str, entries: list[_Entry]) -> None:
        # (unless aclose() has replaced the whole table meanwhile: engine shutdown)
        if not entries and self._entries.get(key) is entries:
            del self._entries[key]

    async def use(
        self,
        host: Host,
        options: dict[str, Any],
        work: Callable[[Lease], Awaitable[T]],
        *,
        connect_timeout: float,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        keep: bool = False,
    ) -> tuple[Lease, T]:
        """Run ``work`` on a leased connection to ``host``, retrying on another one when
        the server refuses a session (sshd's MaxSessions: the connection is marked full)
        or the pooled connection turns out dead (sshd restarted, a NAT forgot it).

        With ``keep`` the lease stays held after success (a kernel's), otherwise it is
        released.  On failure it is always released; ``work`` undoes its own part.
        """
        for attempt in range(1, CONNECTIONS_PER_ATTEMPT + 1):
            lease = await self.lease(
                host, options, connect_timeout=connect_timeout, idle_timeout=idle_timeout
            )
            try:
                result = await work(lease)
            except SessionLimitError as exc:
                lease.mark_full()
                lease.release()
                if attempt == CONNECTIONS_PER_ATTEMPT or not lease.connection.holds_sessions:
                    raise  # (another link to the same OpenSSH master would be refused alike)
                log.info("%s; trying another connection", exc)
                continue
            except (SSHConnectError, TunnelError):
                dead = lease.connection.is_closed()
                lease.release()
                if attempt == CONNECTIONS_PER_ATTEMPT or not dead:
                    raise
                log.info("the pooled connection to %s was dead; reconnecting", host)
                continue
            except BaseException:
                lease.release()
                raise
            if not keep:
                lease.release()
            return lease, result
        raise AssertionError("unreachable")

    def when_reachable(self, host: Host, options: dict[str, Any], errand: Errand) -> None:
        """Run ``errand`` once the next new connection to ``host`` is up (the host is
        reachable again): ending a kernel abandoned during an outage, for one."""
        self._errands.setdefault(self.key_for(host, options), []).append(errand)

    def _run_errands(self, key: str) -> None:
        for errand in self._errands.pop(key, []):
            task = asyncio.get_running_loop().create_task(errand())
            self._errand_tasks.add(task)
            task.add_done_callback(self._errand_tasks.discard)

    def _entry(self, key: str, connection: SSHLink) -> _Entry | None:
        return next((e for e in self._entries.get(key, ()) if e.connection is connection), None)

    def _release(self, key: str, connection: SSHLink, idle_timeout: float) -> None:
        entry = self._entry(key, connection)
        if entry is None:
            return
        entry.leases -= 1
        if entry.leases > 0:
            return
        if idle_timeout <= 0:
            self._drop(key, connection)
        else:
            loop = asyncio.get_running_loop()
            entry.idle_close = loop.call_later(idle_timeout, self._drop, key, connection)

    def _prepare_spare(
        self, key: str, connection: SSHLink, name: str, factory: SpareFactory
    ) -> None:
        entry = self._entry(key, connection)
        if entry is None or entry.full or name in entry.spares or (key, name) in self._preparing:
            return

        async def prepare() -> None:
            try:
                spare = await factory(connection)
            except (asyncssh.Error, OSError) as exc:
                log.debug("no spare %s on %s: %s", name, key, exc)
                return
            finally:
                self._preparing.pop((key, name), None)
            current = self._entry(key, connection)
            if current is None or name in current.spares:
                spare.close()
            else:
                current.spares[name] = spare

        self._preparing[(key, name)] = asyncio.get_running_loop().create_task(prepare())

    def _drop(self, key: str, connection: SSHLink) -> None:
        entry = self._entry(key, connection)
        if entry is not None and entry.leases == 0:
            entries = self._entries[key]
            entries.remove(entry)
            if not entries:
                del self._entries[key]
            self._close_later(entry)

    def _close_later(self, entry: _Entry) -> None:
        entry.close()
        connection = entry.connection
        task = asyncio.get_running_loop().create_task(connection.wait_closed())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @property
    def open_connections(self) -> int:
        return sum(len(entries) for entries in self._entries.values())

    async def aclose(self) -> None:
        """Close every connection, leased or not (server shutdown, test teardown)."""
        entries = [entry for per_key in self._entries.values() for entry in per_key]
        self._entries = {}
        preparing, self._preparing = self._preparing, {}
        errands, self._errand_tasks = self._errand_tasks, set()
        self._errands = {}
        for task in [*preparing.values(), *errands]:
            task.cancel()
        await asyncio.gather(*preparing.values(), *errands, return_exceptions=True)
        for entry in entries:
            entry.close()
        for entry in entries:
            with contextlib.suppress(Exception):
                await entry.connection.wait_closed()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


async def connect(host: Host, options: dict[str, Any], *, connect_timeout: float) -> SSHLink:
    """Open a link to ``host``: through the user's running OpenSSH master if there is
    one (``use_control_master``), else a connection of our own.  Every failure is
    translated into our exception tree."""
    mode = mode_of(options)
    config = await resolve_host_config(host, _public(options))
    check_host_key_checking(
        host, _public(options), config, allow_unchecked=bool(options.get(ALLOW_UNCHECKED))
    )  # the master's connection was made with the same config: refused alike
    master = await open_master(host, _public(options) | {USE_CONTROL_MASTER: mode})
    if master is not None:
        log.info("SSH to %s: through %s", host, master.description)
        return master
    try:
        connection = await _connect(host, options, connect_timeout=connect_timeout, config=config)
        return AsyncsshLink(connection)
    except AuthenticationError as exc:
        hint = "" if mode == "never" else await master_hint(host, _public(options))
        if not hint:
            raise
        raise type(exc)(f"{exc}{hint}", host=str(host), prompted=exc.prompted) from exc


PRIVATE_OPTIONS = (ALLOW_UNCHECKED, KBDINT, AUTH_COOLDOWN, JUMP_DEPTH, USE_CONTROL_MASTER)


def _public(options: dict[str, Any]) -> dict[str, Any]:
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
    options = _public(options)
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
    _acknowledge_now(connection)
    with contextlib.suppress(TimeoutError):
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
