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
How one link is opened (config, host keys, jump hosts) is connect.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import asyncssh

from .connect import asyncssh_options, check_connect_options, connect
from .errors import AuthenticationError, SessionLimitError, SSHConnectError, TunnelError
from .hosts import Host
from .kbdint import AUTH_COOLDOWN, KBDINT
from .link import RemoteProcess, SSHLink
from .master import USE_CONTROL_MASTER, master_running, mode_of
from .sshconfig import ALLOW_UNCHECKED

log = logging.getLogger(__name__)

T = TypeVar("T")
DEFAULT_IDLE_TIMEOUT = 60.0
# Connections one piece of work tries on a host: a pooled connection can be dead, or at
# sshd's MaxSessions, and concurrent starts can fill a fresh one before we use it.
CONNECTIONS_PER_ATTEMPT = 4


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
            public = asyncssh_options(options)
            if not await master_running(host, public | {USE_CONTROL_MASTER: mode}):
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
