"""ConnectionPool.use's logic with a stand-in for connecting: which connection a lease
gets, when a refused session or a dead connection is retried on another one, and
errands that wait for the host.  (The same behaviours are tested against real sshd in
tests/integration/test_resilience.py and test_control_master.py.)"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ssh_provisioner import pool as pool_module
from ssh_provisioner.errors import SessionLimitError, SSHConnectError
from ssh_provisioner.hosts import Host
from ssh_provisioner.pool import CONNECTIONS_PER_ATTEMPT, ConnectionPool, Lease

HOST = Host.parse("alice@gpu1")


class FakeLink:
    """What the pool asks of a connection."""

    def __init__(self, number: int, holds_sessions: bool = True) -> None:
        self.number = number
        self.holds_sessions = holds_sessions
        self.closed = False

    def is_closed(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    async def wait_closed(self) -> None:
        return None


@pytest.fixture
def links(monkeypatch: pytest.MonkeyPatch) -> list[FakeLink]:
    made: list[FakeLink] = []

    async def connect(host: Host, options: dict[str, Any], *, connect_timeout: float) -> Any:
        made.append(FakeLink(len(made), holds_sessions=not options.get("master")))
        return made[-1]

    monkeypatch.setattr(pool_module, "connect", connect)
    return made


async def use(pool: ConnectionPool, work: Any, options: dict[str, Any] | None = None) -> Any:
    return await pool.use(HOST, options or {}, work, connect_timeout=5, idle_timeout=60)


@pytest.mark.asyncio
async def test_leases_share_one_connection(links: list[FakeLink]) -> None:
    pool = ConnectionPool()
    try:

        async def number(lease: Lease) -> int:
            return lease.connection.number  # type: ignore[attr-defined, no-any-return]

        (_, a), (_, b) = [await use(pool, number) for _ in range(2)]
        assert a == b == 0
        assert len(links) == 1
    finally:
        await pool.aclose()


@pytest.mark.asyncio
async def test_a_refused_session_goes_to_another_connection_and_marks_the_first_full(
    links: list[FakeLink],
) -> None:
    pool = ConnectionPool()
    try:
        seen: list[int] = []

        async def refused_on_the_first(lease: Lease) -> int:
            number: int = lease.connection.number  # type: ignore[attr-defined]
            seen.append(number)
            if number == 0:
                raise SessionLimitError("MaxSessions", host=str(HOST))
            return number

        held, result = await pool.use(HOST, {}, refused_on_the_first, connect_timeout=5, keep=True)
        assert (seen, result) == ([0, 1], 1)

        async def number(lease: Lease) -> int:
            return lease.connection.number  # type: ignore[attr-defined, no-any-return]

        _, next_one = await use(pool, number)
        assert next_one == 1  # the full one is passed over while it is full
        held.release()
    finally:
        await pool.aclose()


@pytest.mark.asyncio
async def test_through_an_openssh_master_a_refusal_is_not_retried(links: list[FakeLink]) -> None:
    """Another link to the same master would be refused alike."""
    pool = ConnectionPool()
    try:

        async def refused(lease: Lease) -> None:
            raise SessionLimitError("MaxSessions", host=str(HOST))

        with pytest.raises(SessionLimitError):
            await use(pool, refused, {"master": True})
        assert len(links) == 1
    finally:
        await pool.aclose()


@pytest.mark.asyncio
async def test_a_dead_connection_is_replaced_and_a_live_one_is_not(links: list[FakeLink]) -> None:
    pool = ConnectionPool()
    try:
        attempts: list[int] = []

        async def dies_once(lease: Lease) -> int:
            number: int = lease.connection.number  # type: ignore[attr-defined]
            attempts.append(number)
            if number == 0:
                lease.connection.close()  # sshd restarted under it
                raise SSHConnectError("connection lost", host=str(HOST))
            return number

        _, result = await use(pool, dies_once)
        assert (attempts, result) == ([0, 1], 1)

        async def fails_alive(lease: Lease) -> None:
            attempts.append(lease.connection.number)  # type: ignore[attr-defined]
            raise SSHConnectError("the launcher's channel failed", host=str(HOST))

        with pytest.raises(SSHConnectError):
            await use(pool, fails_alive)
        assert attempts[-1] == 1
        assert len(links) == 2  # a live connection's failure is the work's, not retried
    finally:
        await pool.aclose()


@pytest.mark.asyncio
async def test_retries_are_bounded(links: list[FakeLink]) -> None:
    pool = ConnectionPool()
    try:

        async def always_refused(lease: Lease) -> None:
            raise SessionLimitError("MaxSessions", host=str(HOST))

        with pytest.raises(SessionLimitError):
            await use(pool, always_refused)
        assert len(links) == CONNECTIONS_PER_ATTEMPT
    finally:
        await pool.aclose()


@pytest.mark.asyncio
async def test_an_errand_runs_once_the_next_connection_is_up(links: list[FakeLink]) -> None:
    pool = ConnectionPool()
    try:
        ran = asyncio.Event()

        async def errand() -> None:
            ran.set()

        pool.when_reachable(HOST, {}, errand)
        assert not ran.is_set()

        async def nothing(lease: Lease) -> None:
            return None

        await use(pool, nothing)
        await asyncio.wait_for(ran.wait(), 5)
    finally:
        await pool.aclose()
