"""A session opened through an OpenSSH master (MuxProcess), as a RemoteProcess: the
command's stdin, stdout and stderr are socket pairs whose other ends the master holds."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import TYPE_CHECKING, cast

from .mux_control import MUX_S_EXIT_MESSAGE, MuxControl

if TYPE_CHECKING:
    from .mux import MuxLink

EXIT_STATUS_WAIT = 2.0
CHANNEL_CLOSE_WAIT = 30.0  # under load too: a session counts as ours until then


class PipeEnd(asyncio.Protocol):
    """Our end of a socket pair whose other end the master holds, as one of a session's
    stdin, stdout or stderr.  It closes itself once the master's end is closed."""

    def __init__(self) -> None:
        self.reader = asyncio.StreamReader()
        self.transport: asyncio.Transport | None = None

    @classmethod
    async def wrap(cls, sock: socket.socket) -> PipeEnd:
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

    def __init__(self, link: MuxLink, control: MuxControl, ends: list[PipeEnd]) -> None:
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
    def stdin(self) -> PipeEnd:
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
