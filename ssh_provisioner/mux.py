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
anyone may take once the real master is gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import Callable
from typing import cast

import asyncssh

from .link import CommandResult, RemoteProcess, S, SSHLink, StreamSession

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 4
MUX_MSG_HELLO = 0x00000001
MUX_C_NEW_SESSION = 0x10000002
MUX_C_ALIVE_CHECK = 0x10000004
MUX_C_NEW_STDIO_FWD = 0x10000008
MUX_S_OK = 0x80000001
MUX_S_PERMISSION_DENIED = 0x80000002
MUX_S_FAILURE = 0x80000003
MUX_S_EXIT_MESSAGE = 0x80000004
MUX_S_ALIVE = 0x80000005
MUX_S_SESSION_OPENED = 0x80000006
NO_ESCAPE_CHAR = 0xFFFFFFFF
PACKET_MAX = 256 * 1024
ALIVE_CHECK_TIMEOUT = 2.0
# A session refused while sessions of ours are open on the master is waited for: the
# server's MaxSessions counts the master's sessions, and ours last only while a kernel
# starts or a command runs (see SSHLink.holds_sessions).
SESSION_SLOT_WAIT = 60.0
EXIT_STATUS_WAIT = 2.0
CHANNEL_CLOSE_WAIT = 30.0  # under load too: a session counts as ours until then
# sshd frees a closed channel's session only after it has handled every packet it read
# with the close: a session asked for just after one of ours ended can still be refused.
SESSION_RELEASE_LAG = 1.0
SESSION_RETRY_PAUSE = 0.05


class MasterNotOurs(ConnectionError):
    """The control socket is served by another user's process."""


def _u32(value: int) -> bytes:
    return struct.pack(">I", value)


def _string(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return _u32(len(data)) + data


class _Message:
    def __init__(self, payload: bytes) -> None:
        self._data = payload
        self._at = 0

    def u32(self) -> int:
        if self._at + 4 > len(self._data):
            raise ConnectionError("a truncated message from the OpenSSH master")
        (value,) = struct.unpack_from(">I", self._data, self._at)
        self._at += 4
        return int(value)

    def string(self) -> str:
        size = self.u32()
        data = self._data[self._at : self._at + size]
        self._at += size
        return data.decode("utf-8", "replace")


def peer_uid(sock: socket.socket, path: str) -> int:
    """Who serves the Unix socket: the peer process's uid where the system tells (Linux),
    else the socket file's owner."""
    peercred = getattr(socket, "SO_PEERCRED", None)
    if peercred is not None:
        _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, peercred, 12))
        return int(uid)
    return os.stat(path).st_uid


class _Control:
    """One connection to the master's control socket, past the hello."""

    def __init__(self, sock: socket.socket, path: str) -> None:
        self.sock = sock
        self.path = path
        self._buffer = bytearray()
        self._request_id = 0

    @classmethod
    async def open(cls, path: str) -> _Control:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, path)
            uid = peer_uid(sock, path)
            if uid != os.getuid():
                raise MasterNotOurs(
                    f"the control socket {path} is served by uid {uid}, not by you "
                    f"(uid {os.getuid()}): not using it"
                )
            control = cls(sock, path)
            await control.send(_u32(MUX_MSG_HELLO) + _u32(PROTOCOL_VERSION))
            hello = await control.receive()
            if hello is None or hello.u32() != MUX_MSG_HELLO:
                raise ConnectionError(f"{path} is not an OpenSSH master's control socket")
            version = hello.u32()
            if version != PROTOCOL_VERSION:
                raise ConnectionError(
                    f"the OpenSSH master at {path} speaks mux protocol {version}, "
                    f"not {PROTOCOL_VERSION}"
                )
        except BaseException:
            sock.close()
            raise
        return control

    def next_request(self) -> int:
        self._request_id += 1
        return self._request_id

    async def send(self, payload: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, _u32(len(payload)) + payload)

    async def send_fd(self, fd: int) -> None:
        """Pass ``fd`` to the master, with the one byte the master reads alongside it."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                socket.send_fds(self.sock, [b"\0"], [fd])
                return
            except (BlockingIOError, InterruptedError):
                writable: asyncio.Future[None] = loop.create_future()

                def ready(waiter: asyncio.Future[None] = writable) -> None:
                    if not waiter.done():
                        waiter.set_result(None)

                loop.add_writer(self.sock, ready)
                try:
                    await writable
                finally:
                    loop.remove_writer(self.sock)

    async def receive(self) -> _Message | None:
        """The next message, or None once the master closed the connection."""
        loop = asyncio.get_running_loop()
        while True:
            if len(self._buffer) >= 4:
                (size,) = struct.unpack_from(">I", self._buffer)
                if size > PACKET_MAX:
                    raise ConnectionError(f"an oversized message from the master at {self.path}")
                if len(self._buffer) >= 4 + size:
                    payload = bytes(self._buffer[4 : 4 + size])
                    del self._buffer[: 4 + size]
                    return _Message(payload)
            try:
                data = await loop.sock_recv(self.sock, 65536)
            except ConnectionResetError:
                data = b""
            if not data:
                return None
            self._buffer += data

    async def reply_to(self, request_id: int) -> tuple[int, _Message]:
        """The kind of the master's answer to ``request_id``, and the rest of it; a
        refusal raises ChannelOpenError, a master gone raises ConnectionError."""
        message = await self.receive()
        if message is None:
            raise ConnectionError(f"the OpenSSH master at {self.path} closed the connection")
        kind, answered = message.u32(), message.u32()
        if answered != request_id:
            raise ConnectionError(f"the OpenSSH master at {self.path} answered out of order")
        if kind in (MUX_S_FAILURE, MUX_S_PERMISSION_DENIED):
            code = (
                asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED
                if kind == MUX_S_PERMISSION_DENIED
                else asyncssh.OPEN_CONNECT_FAILED
            )
            reason = f"{message.string()} (OpenSSH master {self.path})"
            raise asyncssh.ChannelOpenError(code, reason)
        return kind, message

    async def alive_check(self) -> int:
        request = self.next_request()
        await self.send(_u32(MUX_C_ALIVE_CHECK) + _u32(request))
        kind, message = await self.reply_to(request)
        if kind != MUX_S_ALIVE:
            raise ConnectionError(f"the OpenSSH master at {self.path} did not answer")
        return message.u32()

    def close(self) -> None:
        self.sock.close()


class _PipeEnd(asyncio.Protocol):
    """Our end of a socket pair whose other end the master holds, as one of a session's
    stdin, stdout or stderr.  It closes itself once the master's end is closed."""

    def __init__(self) -> None:
        self.reader = asyncio.StreamReader()
        self.transport: asyncio.Transport | None = None

    @classmethod
    async def wrap(cls, sock: socket.socket) -> _PipeEnd:
        end = cls()
        await asyncio.get_running_loop().create_unix_connection(lambda: end, sock=sock)
        return end

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.reader.set_transport(self.transport)  # it pauses reading when it holds a lot

    def data_received(self, data: bytes) -> None:
        self.reader.feed_data(data)

    def eof_received(self) -> bool:
        self.reader.feed_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.reader.feed_eof()

    # as a stdin
    def write(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            raise BrokenPipeError("the session's stdin is closed")
        self.transport.write(data)

    def write_eof(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write_eof()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class MuxProcess:
    """A session opened through the master: a RemoteProcess."""

    def __init__(self, link: MuxLink, control: _Control, ends: list[_PipeEnd]) -> None:
        self._link = link
        self._control = control
        self._ends = ends
        self._exit_status: int | None = None
        self._exit_signal: tuple[str, bool, str, str] | None = None
        self._exited = asyncio.Event()
        self._closing = False
        self._closer: asyncio.Task[None] | None = None
        self._follow = asyncio.get_running_loop().create_task(self._follow_master())

    @property
    def stdin(self) -> _PipeEnd:
        return self._ends[0]

    @property
    def stdout(self) -> asyncio.StreamReader:
        return self._ends[1].reader

    @property
    def stderr(self) -> asyncio.StreamReader:
        return self._ends[2].reader

    @property
    def exit_status(self) -> int | None:
        return self._exit_status

    @property
    def exit_signal(self) -> tuple[str, bool, str, str] | None:
        return self._exit_signal

    async def _follow_master(self) -> None:
        try:
            while (message := await self._control.receive()) is not None:
                if message.u32() == MUX_S_EXIT_MESSAGE:
                    message.u32()  # the master's session id
                    self._exit_status = message.u32()
                    self._exited.set()
            if self._exit_status is None and not self._closing:
                # The channel closed with no exit status: the command died of a signal
                # (the master passes on no exit-signal), or the master itself is gone.
                if await self._link.master_alive():
                    self._exit_signal = ("UNKNOWN", False, "no exit status from the master", "")
                else:
                    self._link.lost()
        except OSError:
            self._link.lost()
        finally:
            self._control.close()  # here: no read of it is pending any more
            self._link.session_ended(self)

    def is_closing(self) -> bool:
        return self._closing or self._follow.done()

    def close(self) -> None:
        """End the session: the master closes its channel once our ends are gone.

        Not before its command's exit status has come, if it is about to (a detached
        launcher's session, a command that has finished): then sshd has reaped the
        command, and frees the session as soon as the channel closes.  A session whose
        command lives on is closed after ``EXIT_STATUS_WAIT``.  It counts as ours (see
        ``MuxLink.start_process``) until the master has closed the channel."""
        if self._closing:
            return
        self._closing = True
        self._closer = asyncio.get_running_loop().create_task(self._close())

    async def _close(self) -> None:
        self.stdin.write_eof()  # a command that reads its stdin ends now (a spare launcher)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._exited.wait(), EXIT_STATUS_WAIT)
        for end in self._ends:
            end.close()
        try:  # the master closes the control connection once sshd closed the channel
            await asyncio.wait_for(asyncio.shield(self._follow), CHANNEL_CLOSE_WAIT)
        except TimeoutError:
            self._follow.cancel()

    def abort(self) -> None:
        """Close at once (the master is gone, or we let go of it)."""
        self._closing = True
        if self._closer is not None:
            self._closer.cancel()
        self._follow.cancel()
        for end in self._ends:
            end.close()

    async def wait_closed(self) -> None:
        """Until the master has closed the session's channel (what it relayed is in our
        ends' buffers by then)."""
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(self._follow)


class _MuxStream(asyncio.Protocol):
    """A stdio forward's end in our process, as an asyncssh stream session sees a
    channel: ``write`` and ``close``; the session's callbacks are passed on."""

    def __init__(self, link: MuxLink, control: _Control, session: StreamSession) -> None:
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


async def master_answers(path: str) -> bool:
    """Does an OpenSSH master of ours answer at ``path`` now?  (Nothing is kept open.)"""
    try:
        control = await asyncio.wait_for(_Control.open(path), ALIVE_CHECK_TIMEOUT)
    except (OSError, TimeoutError):
        return False
    control.close()
    return True


class MuxLink(SSHLink):
    """Everything on one host through the user's OpenSSH master.

    One idle control connection watches the master: when it ends, so has the master,
    and the link is closed (a lost connection, as with our own).  While the link is
    open it also keeps the master from exiting by ControlPersist (a control client
    counts as a user of the master)."""

    unix_forwarding = False  # stdio forwarding to a Unix socket came in OpenSSH 9.4
    holds_sessions = False

    def __init__(self, path: str, username: str, watcher: _Control, pid: int) -> None:
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
        self._held_controls: list[_Control] = []  # of open_socket's sockets
        self._watch = asyncio.get_running_loop().create_task(self._watch_master())

    @classmethod
    async def open(cls, path: str, username: str) -> MuxLink:
        """Connect to the master at ``path``; raises OSError if none answers there."""
        watcher = await _Control.open(path)
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
            control = await asyncio.wait_for(_Control.open(self.path), ALIVE_CHECK_TIMEOUT)
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
        control = await _Control.open(self.path)
        ours: list[socket.socket] = []
        try:
            request = control.next_request()
            await control.send(
                _u32(MUX_C_NEW_SESSION)
                + _u32(request)
                + _string("")  # reserved
                + _u32(0) * 4  # no tty, X11 or agent forwarding; not a subsystem
                + _u32(NO_ESCAPE_CHAR)
                + _string("")  # terminal type
                + _string(command)
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
            ends = [await _PipeEnd.wrap(sock) for sock in ours]
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
        control = await _Control.open(self.path)
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
        control = await _Control.open(self.path)
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
        self, control: _Control, theirs: socket.socket, host: str, port: int
    ) -> None:
        request = control.next_request()
        await control.send(
            _u32(MUX_C_NEW_STDIO_FWD) + _u32(request) + _string("") + _string(host) + _u32(port)
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
