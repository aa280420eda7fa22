"""What the provisioner needs from an SSH connection to a host, whoever carries it.

Two kinds carry it: the provisioner's own asyncssh connection (``AsyncsshLink``), and
an OpenSSH master the user opened by hand (``mux.MuxLink``: the master has done the
two-factor login, we reuse it).  Everything above the pool (the launcher's channel,
the relayed streams, probes, the doctor) uses only this surface: a process with its
stdin/stdout/stderr, a command's result, a byte stream to a port or path on the host.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import asyncssh


class ByteReader(Protocol):
    async def read(self, n: int = -1) -> bytes: ...


class ByteWriter(Protocol):
    def write(self, data: bytes) -> None: ...

    def write_eof(self) -> None: ...


class RemoteProcess(Protocol):
    """A command running on the host: asyncssh's SSHClientProcess is one."""

    @property
    def stdin(self) -> ByteWriter: ...

    @property
    def stdout(self) -> ByteReader: ...

    @property
    def stderr(self) -> ByteReader: ...

    @property
    def exit_status(self) -> int | None: ...

    @property
    def exit_signal(self) -> tuple[str, bool, str, str] | None: ...

    def is_closing(self) -> bool: ...

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...


class StreamSession(Protocol):
    """The callbacks of an asyncssh stream session (SSHTCPSession): one end of a byte
    stream to the host, told what arrives and when its channel can take more."""

    def connection_made(self, chan: StreamChannel) -> None: ...

    def session_started(self) -> None: ...

    def data_received(self, data: bytes, datatype: int | None) -> None: ...

    def eof_received(self) -> bool: ...

    def connection_lost(self, exc: Exception | None) -> None: ...

    def pause_writing(self) -> None: ...

    def resume_writing(self) -> None: ...


class StreamChannel(Protocol):
    def write(self, data: bytes) -> None: ...

    def write_eof(self) -> None: ...

    def close(self) -> None: ...


S = TypeVar("S", bound=StreamSession)


@dataclass(frozen=True)
class CommandResult:
    exit_status: int | None
    stdout: str
    stderr: str


# What the host may send on a stream's channel before we confirm it (asyncssh's default
# is 2 MiB, topped up at half): over a 50 ms link that caps a kernel's output near
# 1 MB a round trip, half of what OpenSSH's own channel moves.  Only a client slower
# than the link makes it memory (its stream pauses the channel, and the rest waits here).
STREAM_WINDOW = 8 * 1024 * 1024


class SSHLink(abc.ABC):
    """A live connection to one host."""

    #: Can it forward a stream to a Unix socket on the host?
    unix_forwarding = True
    #: Does a kernel's launcher hold a session for the kernel's life, or only while it
    #: starts (a master's sessions count against the server's MaxSessions)?
    holds_sessions = True

    @property
    @abc.abstractmethod
    def description(self) -> str:
        """How we reach the host, for log lines and the doctor."""

    @property
    @abc.abstractmethod
    def username(self) -> str: ...

    @abc.abstractmethod
    async def start_process(self, command: str, *, spare: bool = False) -> RemoteProcess:
        """Run ``command`` (a shell command line) with binary pipes.  A ``spare`` waits
        in reserve (a launcher before its spec): a link short of sessions may end it
        for a start that needs its session, until ``claim`` takes it into use."""

    def claim(self, process: RemoteProcess) -> None:
        """A spare from ``start_process`` is in use now: it is not to be ended."""
        del process  # only a link short of sessions keeps a list of its spares

    @abc.abstractmethod
    async def run(self, command: str) -> CommandResult:
        """Run ``command`` with no input, to its end."""

    @abc.abstractmethod
    async def open_tcp(self, factory: Callable[[], S], host: str, port: int) -> S:
        """A byte stream to ``host``:``port`` as the host sees it."""

    @abc.abstractmethod
    async def open_unix(self, factory: Callable[[], S], path: str) -> S:
        """A byte stream to the Unix socket at ``path`` on the host."""

    @abc.abstractmethod
    def is_closed(self) -> bool: ...

    async def check_alive(self) -> bool:
        """Is the link still up?  Asked when a channel ended with no word of why: the
        command died, or the link under it did (``is_closed`` may not know yet)."""
        return not self.is_closed()

    @abc.abstractmethod
    def close(self) -> None: ...

    @abc.abstractmethod
    async def wait_closed(self) -> None: ...


class AsyncsshLink(SSHLink):
    """Our own asyncssh connection (the default): authenticated by us, with its
    ProxyJump hops closed along with it."""

    def __init__(self, connection: asyncssh.SSHClientConnection) -> None:
        self.connection = connection

    @property
    def description(self) -> str:
        return "its own SSH connection"

    @property
    def username(self) -> str:
        return str(self.connection.get_extra_info("username"))

    async def start_process(self, command: str, *, spare: bool = False) -> RemoteProcess:
        return await self.connection.create_process(command, encoding=None, stdin=asyncssh.PIPE)

    async def run(self, command: str) -> CommandResult:
        result = await self.connection.run(command)
        return CommandResult(result.exit_status, str(result.stdout or ""), str(result.stderr or ""))

    async def open_tcp(self, factory: Callable[[], S], host: str, port: int) -> S:
        _, session = await self.connection.create_connection(
            factory,  # type: ignore[arg-type]
            host,
            port,
            window=STREAM_WINDOW,
        )
        return session  # type: ignore[return-value]

    async def open_unix(self, factory: Callable[[], S], path: str) -> S:
        _, session = await self.connection.create_unix_connection(
            factory,  # type: ignore[arg-type]
            path,
            window=STREAM_WINDOW,
        )
        return session  # type: ignore[return-value]

    def is_closed(self) -> bool:
        return self.connection.is_closed()

    def close(self) -> None:
        self.connection.close()

    async def wait_closed(self) -> None:
        await self.connection.wait_closed()
