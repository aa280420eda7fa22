"""An SSHLink without SSH, for the fast tier: commands run as local processes (the
real launcher, from its real payload), and streams are local sockets to the relay.
``cut()`` loses every channel at once, as a lost connection does: the launcher sees
its stdin end and its relay its connections drop, and nothing on the "host" is killed."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import signal
from collections.abc import Callable
from typing import Any, TypeVar

from ssh_provisioner.link import CommandResult, RemoteProcess, SSHLink

S = TypeVar("S")


class _Channel:
    """What an asyncssh channel offers a stream session, over a local socket."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport

    def write(self, data: bytes) -> None:
        self._transport.write(data)

    def write_eof(self) -> None:
        self._transport.write_eof()

    def close(self) -> None:
        self._transport.close()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()


class _Adapter(asyncio.Protocol):
    def __init__(self, session: Any) -> None:
        self.session = session

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.session.connection_made(_Channel(transport))  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        self.session.data_received(data, None)

    def eof_received(self) -> bool:
        return bool(self.session.eof_received())

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.connection_lost(exc)

    def pause_writing(self) -> None:
        self.session.pause_writing()

    def resume_writing(self) -> None:
        self.session.resume_writing()


class _Stdin:
    def __init__(self, process: LocalProcess) -> None:
        self._process = process

    def write(self, data: bytes) -> None:
        if self._process.cut:
            raise BrokenPipeError("the link is down")
        stream = self._process.process.stdin
        assert stream is not None
        stream.write(data)

    def write_eof(self) -> None:
        stream = self._process.process.stdin
        if stream is not None and not stream.is_closing():
            stream.write_eof()


class LocalProcess:
    """A command's process, as a session channel shows it (``RemoteProcess``)."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.cut = False

    @property
    def stdin(self) -> _Stdin:
        return _Stdin(self)

    @property
    def stdout(self) -> asyncio.StreamReader:
        assert self.process.stdout is not None
        return self.process.stdout

    @property
    def stderr(self) -> asyncio.StreamReader:
        assert self.process.stderr is not None
        return self.process.stderr

    @property
    def exit_status(self) -> int | None:
        code = self.process.returncode
        return code if code is not None and code >= 0 and not self.cut else None

    @property
    def exit_signal(self) -> tuple[str, bool, str, str] | None:
        code = self.process.returncode
        if code is None or code >= 0 or self.cut:
            return None
        return (signal.Signals(-code).name.removeprefix("SIG"), False, "", "")

    def is_closing(self) -> bool:
        return self.cut or self.process.returncode is not None

    def close(self) -> None:
        """The channel closes: the process's pipes end (it is not killed)."""
        self.cut = True
        if self.process.stdin is not None:
            self.process.stdin.close()
        transport = self.process._transport  # type: ignore[attr-defined]
        for fd in (1, 2):  # its output goes nowhere now: EOF here, EPIPE there
            pipe = transport.get_pipe_transport(fd)
            if pipe is not None:
                pipe.close()

    async def wait_closed(self) -> None:
        if self.cut:
            return
        await self.process.wait()


class LocalLink(SSHLink):
    def __init__(self) -> None:
        self.closed = False
        self.processes: list[LocalProcess] = []
        self._transports: list[asyncio.BaseTransport] = []

    @property
    def description(self) -> str:
        return "a local stand-in for SSH"

    @property
    def username(self) -> str:
        return getpass.getuser()

    async def start_process(self, command: str, *, spare: bool = False) -> RemoteProcess:
        if self.closed:
            raise OSError("the link is down")
        process = await asyncio.create_subprocess_shell(
            command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # its own session, as sshd gives a command
        )
        self.processes.append(LocalProcess(process))
        return self.processes[-1]

    async def run(self, command: str) -> CommandResult:
        process = await asyncio.create_subprocess_shell(
            command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await process.communicate()
        return CommandResult(process.returncode, out.decode(), err.decode())

    async def open_tcp(self, factory: Callable[[], S], host: str, port: int) -> S:
        if self.closed:
            raise OSError("the link is down")
        session = factory()
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_connection(lambda: _Adapter(session), host, port)
        self._transports.append(transport)
        return session

    async def open_unix(self, factory: Callable[[], S], path: str) -> S:
        if self.closed:
            raise OSError("the link is down")
        session = factory()
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_unix_connection(lambda: _Adapter(session), path)
        self._transports.append(transport)
        return session

    def is_closed(self) -> bool:
        return self.closed

    def cut(self) -> None:
        """The connection is lost: every channel ends at once, nothing is killed."""
        self.closed = True
        for transport in self._transports:
            transport.abort()  # type: ignore[attr-defined]
        for process in self.processes:
            process.close()

    def close(self) -> None:
        self.cut()

    async def wait_closed(self) -> None:
        return None

    async def kill_all(self) -> None:
        """Test teardown: end every process this link started, by PID.  SIGTERM first:
        a launcher then ends its kernel and removes its runtime dir."""
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                process.process.terminate()
            try:
                await asyncio.wait_for(process.process.wait(), 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.process.kill()
                await process.process.wait()
