"""An OpenSSH master reused through its control socket, speaking the mux protocol
(OpenSSH's PROTOCOL.mux) ourselves.

The user opened the master by hand (``ssh -fN HOST``, typing the second factor once);
every session and stream the provisioner needs then rides on that one authenticated
connection, with no new login:

- a session (``MUX_C_NEW_SESSION``): we pass the master three socket pairs' ends as
  the command's stdin, stdout and stderr (SCM_RIGHTS), and it relays them to the
  channel itself;
- a byte stream to a port on the host (``MUX_C_NEW_STDIO_FWD``, what ``ssh -W`` asks
  for): one socket pair's end, relayed to a direct-tcpip channel.

Why the protocol and not ``ssh -S PATH ...`` processes: a kernel needs a session and
five streams, and each stream resumes after a blip.  As processes that is six local
``ssh`` clients per kernel, each 10-20 ms and a few MB to start, and their deaths to
watch.  Spoken here it is one Unix-socket connection per channel, and the bytes go
from our socket straight to the master, with no process in between.

Nothing is sent to a socket served by another user: the peer's uid (SO_PEERCRED) must
be ours, or the socket is refused before the hello (a ControlPath in /tmp is a path
anyone may take once the real master is gone).  The protocol's messages and the control
connection are mux_control.py's; here are the sessions and streams opened with them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable

import asyncssh

from .link import CommandResult, RemoteProcess, S, SSHLink, StreamSession
from .mux_control import (
    ALIVE_CHECK_TIMEOUT,
    MUX_C_NEW_SESSION,
    MUX_C_NEW_STDIO_FWD,
    MUX_S_SESSION_OPENED,
    NO_ESCAPE_CHAR,
    MuxControl,
    string,
    u32,
)
from .mux_process import MuxProcess, PipeEnd

log = logging.getLogger(__name__)

# A session refused while sessions of ours are open on the master is waited for: the
# server's MaxSessions counts the master's sessions, and ours last only while a kernel
# starts or a command runs (see SSHLink.holds_sessions).
SESSION_SLOT_WAIT = 60.0
# sshd frees a closed channel's session only after it has handled every packet it read
# with the close: a session asked for just after one of ours ended can still be refused.
SESSION_RELEASE_LAG = 1.0
SESSION_RETRY_PAUSE = 0.05


class _MuxStream(asyncio.Protocol):
    """A stdio forward's end in our process, as an asyncssh stream session sees a
    channel: ``write`` and ``close``; the session's callbacks are passed on."""

    def __init__(self, link: MuxLink, control: MuxControl, session: StreamSession) -> None:
        self._link = link
        self._control = control
        self._session = session
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._session.connection_made(self)

    def data_received(self, data: bytes) -> None:
        self._session.data_received(data, None)

    def eof_received(self) -> bool:
        return self._session.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._control.close()
        self._link.stream_ended(self)
        self._session.connection_lost(exc)

    def pause_writing(self) -> None:
        self._session.pause_writing()

    def resume_writing(self) -> None:
        self._session.resume_writing()

    def write(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.write(data)

    def write_eof(self) -> None:
        if self._transport is not None and self._transport.can_write_eof():
            self._transport.write_eof()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        self._control.close()


class MuxLink(SSHLink):
    """Everything on one host through the user's OpenSSH master.

    One idle control connection watches the master: when it ends, so has the master,
    and the link is closed (a lost connection, as with our own).  While the link is
    open it also keeps the master from exiting by ControlPersist (a control client
    counts as a user of the master)."""

    unix_forwarding = False  # stdio forwarding to a Unix socket came in OpenSSH 9.4
    holds_sessions = False

    def __init__(self, path: str, username: str, watcher: MuxControl, pid: int) -> None:
        self.path = path
        self.master_pid = pid
        self._username = username
        self._watcher = watcher
        self._closed = False
        self._sessions: set[MuxProcess] = set()
        self._spares: set[MuxProcess] = set()
        self._streams: set[_MuxStream] = set()
        self._session_freed = asyncio.Event()  # replaced each time one is set
        # Session requests of ours in flight count as ours: a refusal that overtakes
        # them is not "someone else's sessions" (concurrent starts at MaxSessions).
        self._requests_in_flight = 0
        self._request_settled = asyncio.Event()  # replaced each time one is set
        self._last_session_end = -SESSION_RELEASE_LAG
        self._held_controls: list[MuxControl] = []  # of open_socket's sockets
        self._watch = asyncio.get_running_loop().create_task(self._watch_master())

    @classmethod
    async def open(cls, path: str, username: str) -> MuxLink:
        """Connect to the master at ``path``; raises OSError if none answers there."""
        watcher = await MuxControl.open(path)
        try:
            pid = await asyncio.wait_for(watcher.alive_check(), ALIVE_CHECK_TIMEOUT)
        except BaseException:
            watcher.close()
            raise
        return cls(path, username, watcher, pid)

    @property
    def description(self) -> str:
        return f"the OpenSSH master at {self.path}"

    @property
    def in_a_terminal(self) -> bool:
        """Is the master an interactive ``ssh HOST`` (it has a controlling terminal),
        rather than one in the background (``ssh -fN``, ControlPersist)?  Linux only."""
        try:
            with open(f"/proc/{self.master_pid}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            return False
        return len(fields) > 4 and fields[4] != b"0"  # tty_nr

    @property
    def username(self) -> str:
        return self._username

    async def _watch_master(self) -> None:
        try:
            with contextlib.suppress(OSError):
                while await self._watcher.receive() is not None:
                    pass  # the master says nothing unasked: only its end matters
            self.lost()
        finally:
            self._watcher.close()  # here: no read of it is pending any more

    async def master_alive(self) -> bool:
        if self._closed:
            return False
        try:
            control = await asyncio.wait_for(MuxControl.open(self.path), ALIVE_CHECK_TIMEOUT)
        except (OSError, TimeoutError):
            return False
        try:
            pid = await asyncio.wait_for(control.alive_check(), ALIVE_CHECK_TIMEOUT)
        except (OSError, TimeoutError, asyncssh.Error):
            return False
        finally:
            control.close()
        return pid == self.master_pid

    async def check_alive(self) -> bool:
        if await self.master_alive():
            return True
        self.lost()
        return False

    def lost(self) -> None:
        """The master is gone: every session and stream through it ends."""
        if self._closed:
            return
        self._closed = True
        log.info("the OpenSSH master at %s is gone", self.path)
        if asyncio.current_task() is not self._watch:
            self._watch.cancel()
        self._end_everything()

    def _end_everything(self) -> None:
        for process in list(self._sessions):
            process.abort()
        for stream in list(self._streams):
            stream.close()
        for control in self._held_controls:
            control.close()
        self._held_controls.clear()

    # -- sessions -----------------------------------------------------------------------

    async def start_process(self, command: str, *, spare: bool = False) -> RemoteProcess:
        """A session through the master.  When the server refuses one (its MaxSessions
        counts all of the master's sessions), a spare of ours yields its session, or
        one of ours that is about to end is waited for."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SESSION_SLOT_WAIT
        while True:
            freed = self._session_freed
            try:
                process = await self._open_counted(command)
            except asyncssh.ChannelOpenError:
                if spare or loop.time() >= deadline:
                    raise
                if self._spares:
                    log.debug(
                        "%s: at the server's MaxSessions; a spare yields its session", self.path
                    )
                    self._spares.pop().close()
                elif loop.time() - self._last_session_end < SESSION_RELEASE_LAG:
                    await asyncio.sleep(SESSION_RETRY_PAUSE)  # ours ended; sshd frees it next
                    continue
                elif not self._sessions and self._requests_in_flight:
                    # ours may be taking the last sessions: once they are answered, this
                    # one waits for a session of ours to end, or is refused for good
                    settled = self._request_settled
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(settled.wait(), deadline - loop.time())
                    continue
                elif not self._sessions:
                    raise  # the sessions are someone else's: nothing of ours will free one
                log.debug("%s: at the server's MaxSessions; waiting for a session", self.path)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(freed.wait(), deadline - loop.time())
                continue
            if spare:
                self._spares.add(process)
            return process

    def claim(self, process: RemoteProcess) -> None:
        self._spares.discard(process)

    async def _open_counted(self, command: str) -> MuxProcess:
        self._requests_in_flight += 1
        try:
            return await self._open_session(command)
        finally:
            self._requests_in_flight -= 1
            settled, self._request_settled = self._request_settled, asyncio.Event()
            settled.set()

    async def _open_session(self, command: str) -> MuxProcess:
        self._check_open()
        control = await MuxControl.open(self.path)
        ours: list[socket.socket] = []
        try:
            request = control.next_request()
            await control.send(
                u32(MUX_C_NEW_SESSION)
                + u32(request)
                + string("")  # reserved
                + u32(0) * 4  # no tty, X11 or agent forwarding; not a subsystem
                + u32(NO_ESCAPE_CHAR)
                + string("")  # terminal type
                + string(command)
            )
            for _ in ("stdin", "stdout", "stderr"):
                mine, theirs = socket.socketpair()
                ours.append(mine)
                try:
                    await control.send_fd(theirs.fileno())
                finally:
                    theirs.close()
            kind, _ = await control.reply_to(request)
            if kind != MUX_S_SESSION_OPENED:
                raise ConnectionError(f"the OpenSSH master at {self.path} opened no session")
            ends = [await PipeEnd.wrap(sock) for sock in ours]
        except BaseException:
            control.close()
            for sock in ours:
                sock.close()
            raise
        process = MuxProcess(self, control, ends)
        self._sessions.add(process)
        return process

    def session_ended(self, process: MuxProcess) -> None:
        self._spares.discard(process)
        if process in self._sessions:
            self._sessions.discard(process)
            self._last_session_end = asyncio.get_running_loop().time()
            freed, self._session_freed = self._session_freed, asyncio.Event()
            freed.set()

    async def run(self, command: str) -> CommandResult:
        process = await self.start_process(command)
        try:
            process.stdin.write_eof()
            stdout, stderr = await asyncio.gather(process.stdout.read(), process.stderr.read())
            await process.wait_closed()
        finally:
            process.close()
        return CommandResult(
            process.exit_status,
            stdout.decode("utf-8", "replace"),
            stderr.decode("utf-8", "replace"),
        )

    # -- streams ------------------------------------------------------------------------

    async def open_tcp(self, factory: Callable[[], S], host: str, port: int) -> S:
        self._check_open()
        control = await MuxControl.open(self.path)
        mine, theirs = socket.socketpair()
        try:
            await self._request_forward(control, theirs, host, port)
            session = factory()
            stream = _MuxStream(self, control, session)
            self._streams.add(stream)
            await asyncio.get_running_loop().create_unix_connection(lambda: stream, sock=mine)
        except BaseException:
            control.close()
            mine.close()
            raise
        return session

    async def open_socket(self, host: str, port: int) -> socket.socket:
        """A socket whose other end is ``host``:``port`` as the host sees it (to run an
        SSH connection of our own through the master: a ProxyJump hop).  It lives until
        the link is closed."""
        self._check_open()
        control = await MuxControl.open(self.path)
        mine, theirs = socket.socketpair()
        try:
            await self._request_forward(control, theirs, host, port)
        except BaseException:
            control.close()
            mine.close()
            raise
        self._held_controls.append(control)
        return mine

    async def _request_forward(
        self, control: MuxControl, theirs: socket.socket, host: str, port: int
    ) -> None:
        request = control.next_request()
        await control.send(
            u32(MUX_C_NEW_STDIO_FWD) + u32(request) + string("") + string(host) + u32(port)
        )
        try:
            await control.send_fd(theirs.fileno())  # the forward's input
            await control.send_fd(theirs.fileno())  # and output: one socket
        finally:
            theirs.close()
        await control.reply_to(request)

    async def open_unix(self, factory: Callable[[], S], path: str) -> S:
        raise asyncssh.ChannelOpenError(
            asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
            f"streams to Unix sockets through an OpenSSH master need OpenSSH 9.4 ({self.path})",
        )

    def stream_ended(self, stream: _MuxStream) -> None:
        self._streams.discard(stream)

    # -- the link -----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ConnectionError(f"the OpenSSH master at {self.path} is gone")

    def is_closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Let go of the master (it stays up for the user's own sessions)."""
        if self._closed:
            return
        self._closed = True
        self._watch.cancel()
        self._end_everything()

    async def wait_closed(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(self._watch)
