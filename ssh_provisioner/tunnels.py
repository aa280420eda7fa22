"""KernelPorts: a kernel's five local ports, bound once and kept for its whole life.

Each port is a listener on 127.0.0.1 that this process owns from the first start to the
final cleanup, through restarts and lost connections.  An accepted connection is relayed
over an SSH channel (on the kernel's pooled connection) to the kernel's endpoint of the
moment.  While there is none (the host is unreachable, the kernel is restarting) the
connection is *held*: accepted, not read, and relayed as soon as the kernel is back.
So no other local process can take a port during a blip, clients are never refused, and
the ports in ``connection_info`` never change.

When the kernel comes back, IOPub goes first: the other channels stay held until the
kernel has sent a message to every IOPub client connected before (ipykernel >= 7
welcomes each new subscriber, JEP 65), or ``IOPUB_FIRST_BOUND`` passes.  A PUB socket
sends only to subscribers it knows, so a request relayed after that gets all of its
output.  (Seeing the client's subscription go out is not enough: the kernel's PUB
socket takes it in only at a later send, and the first output can miss it.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any, cast

import asyncssh

from .errors import TunnelError
from .launcher import CHANNELS

log = logging.getLogger(__name__)

LOCAL_ADDRESS = "127.0.0.1"
IOPUB_FIRST_BOUND = 1.5  # seconds other channels wait for IOPub's clients at most
MAX_HELD_PER_PORT = 32  # older held connections are closed (their clients reconnect)
HELD_BUFFER_LIMIT = 64 * 1024  # what a held connection's client may send before it waits
Endpoint = int | str  # a TCP port on the host's loopback, or a Unix socket path


@dataclass(frozen=True, eq=False)
class Target:
    """Where the kernel's channels are now: its endpoints, over one SSH connection."""

    connection: asyncssh.SSHClientConnection
    endpoints: dict[str, Endpoint]


class FirstMessageWatch:
    """Follows the ZMTP 3 stream a kernel's PUB socket sends a client until its first
    message: a message frame, or a MESSAGE command (CurveZMQ), past the handshake."""

    GREETING = 64
    MAX_FRAME = 64 * 1024  # past this, stop watching: count it as a message

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._greeted = False

    def feed(self, data: bytes) -> bool:
        """True once a message has been seen."""
        buffer = self._buffer
        buffer += data
        if not self._greeted:
            if len(buffer) < self.GREETING:
                return False
            del buffer[: self.GREETING]
            self._greeted = True
        while len(buffer) >= 2:
            flags = buffer[0]
            if flags & 0x02:
                if len(buffer) < 9:
                    return False
                size, head = int.from_bytes(buffer[1:9], "big"), 9
            else:
                size, head = buffer[1], 2
            if size > self.MAX_FRAME:
                return True
            if len(buffer) < head + size:
                return False
            body = bytes(buffer[head : head + size])
            del buffer[: head + size]
            if not flags & 0x04:
                return True
            name = body[1 : 1 + body[0]] if body else b""
            if name == b"MESSAGE":
                return True
        return False


class _ChannelSide:
    """The SSH channel's end of a link (shared by the TCP and Unix session classes)."""

    def __init__(self, link: _Link) -> None:
        self._link = link

    def connection_made(self, chan: Any) -> None:
        self._link.connected(chan)

    def data_received(self, data: bytes, datatype: int | None) -> None:
        self._link.write_local(data)

    def eof_received(self) -> bool:
        self._link.remote_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._link.close()

    def pause_writing(self) -> None:
        self._link.pause_local()

    def resume_writing(self) -> None:
        self._link.resume_local()


class _TCPChannelSide(_ChannelSide, asyncssh.SSHTCPSession[bytes]):
    pass


class _UnixChannelSide(_ChannelSide, asyncssh.SSHUNIXSession[bytes]):
    pass


class _Link(asyncio.Protocol):
    """One accepted local connection: held, then relayed to one SSH channel."""

    def __init__(self, ports: KernelPorts, channel: str) -> None:
        self._ports = ports
        self.channel = channel
        self._transport: asyncio.Transport | None = None
        self._remote: asyncssh.SSHTCPChannel[bytes] | asyncssh.SSHUNIXChannel[bytes] | None = None
        self._watch = FirstMessageWatch() if channel == "iopub" else None
        self._pending = bytearray()  # read before the channel is open
        self._local_eof = False
        self._eofs = 0
        self.closed = False

    # -- local side (asyncio.Protocol) ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        # Python < 3.12 starts reading after connection_made even when paused in it
        # (hence _pending); from 3.12 a held connection is not read at all.
        self._transport.pause_reading()
        self._ports.accepted(self)

    def data_received(self, data: bytes) -> None:
        if self._remote is not None:
            self._remote.write(data)
            return
        self._pending += data
        if len(self._pending) >= HELD_BUFFER_LIMIT and self._transport is not None:
            self._transport.pause_reading()

    def eof_received(self) -> bool:
        self._local_eof = True
        if self._remote is not None:
            self._remote.write_eof()
        self._count_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()

    def pause_writing(self) -> None:
        if self._remote is not None:
            self._remote.pause_reading()

    def resume_writing(self) -> None:
        if self._remote is not None:
            self._remote.resume_reading()

    # -- called by the channel side ------------------------------------------------------

    def write_local(self, data: bytes) -> None:
        if self._watch is not None and self._watch.feed(data):
            self._watch = None
            self._ports.subscribed(self)
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def remote_eof(self) -> None:
        if self._transport is not None and self._transport.can_write_eof():
            with contextlib.suppress(OSError):
                self._transport.write_eof()
        self._count_eof()

    def pause_local(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()

    def resume_local(self) -> None:
        # never before the channel is there: what is read then would be lost
        if self._remote is None or self._transport is None or self._transport.is_closing():
            return
        self._transport.resume_reading()

    def connected(
        self, remote: asyncssh.SSHTCPChannel[bytes] | asyncssh.SSHUNIXChannel[bytes]
    ) -> None:
        self._remote = remote
        if self.closed:
            remote.close()
            return
        if self._pending:
            remote.write(bytes(self._pending))
            self._pending.clear()
        if self._local_eof:
            remote.write_eof()

    # -- life ----------------------------------------------------------------------------

    async def relay(self, target: Target) -> None:
        """Open the SSH channel to the kernel's endpoint and start relaying."""
        endpoint = target.endpoints[self.channel]
        try:
            if isinstance(endpoint, str):
                await target.connection.create_unix_connection(
                    lambda: _UnixChannelSide(self), endpoint
                )
            else:
                await target.connection.create_connection(
                    lambda: _TCPChannelSide(self), LOCAL_ADDRESS, endpoint
                )
        except (asyncssh.Error, OSError) as exc:
            log.debug("%s: cannot reach the kernel's endpoint %r: %s", self.channel, endpoint, exc)
            self.close()  # the client reconnects, and is held or relayed again
            return
        except BaseException:
            self.close()
            raise
        self.resume_local()

    def _count_eof(self) -> None:
        self._eofs += 1
        if self._eofs >= 2:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._transport is not None:
            self._transport.close()
        if self._remote is not None:
            self._remote.close()
        self._ports.forget(self)


class KernelPorts:
    """The kernel's local ports and the links accepted on them.

    ``attach(target)`` points them at a kernel, ``detach()`` takes the kernel away
    (relayed links close, their clients reconnect and are held), ``aclose()`` unbinds.
    Runs on the engine's loop."""

    def __init__(self) -> None:
        self._servers: dict[str, asyncio.Server] = {}
        self._held: dict[str, list[_Link]] = {channel: [] for channel in CHANNELS}
        self._relayed: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._target: Target | None = None
        self._gate_open = False
        self._gate_timer: asyncio.TimerHandle | None = None
        self._iopub_expected = 0
        self._iopub_subscribed = 0

    @classmethod
    async def open(cls, preferred: dict[str, int] | None = None) -> KernelPorts:
        """Bind the five ports: ``preferred`` ones where free (a kernel taken over from
        another process keeps its ports), new ones otherwise."""
        ports = cls()
        loop = asyncio.get_running_loop()
        try:
            for channel in CHANNELS:
                wanted = (preferred or {}).get(channel, 0)

                def protocol(channel: str = channel) -> _Link:
                    return _Link(ports, channel)

                try:
                    server = await loop.create_server(protocol, LOCAL_ADDRESS, wanted)
                except OSError as exc:
                    if not wanted:
                        raise TunnelError(f"cannot bind a local port for {channel}: {exc}") from exc
                    log.warning(
                        "local port %d (%s) is taken: %s; using a new one", wanted, channel, exc
                    )
                    server = await loop.create_server(protocol, LOCAL_ADDRESS, 0)
                ports._servers[channel] = server
        except BaseException:
            await asyncio.shield(ports.aclose())
            raise
        return ports

    @property
    def numbers(self) -> dict[str, int]:
        return {
            channel: server.sockets[0].getsockname()[1] for channel, server in self._servers.items()
        }

    def attach(self, target: Target) -> None:
        """Relay to ``target`` from now on: IOPub first, the rest once the kernel has
        sent IOPub's clients a message (so it knows them as subscribers)."""
        self._target = target
        self._iopub_subscribed = 0
        if self._iopub_expected:
            self._gate_open = False
            self._gate_timer = asyncio.get_running_loop().call_later(
                IOPUB_FIRST_BOUND, self._open_gate
            )
        else:
            self._gate_open = True
        for channel in CHANNELS:
            if channel == "iopub" or self._gate_open:
                self._relay_held(channel)

    def detach(self) -> None:
        """The kernel is out of reach: close relayed links; new ones are held."""
        self._target = None
        self._gate_open = False
        if self._gate_timer is not None:
            self._gate_timer.cancel()
            self._gate_timer = None
        relayed = list(self._relayed)
        iopub_clients = sum(1 for link in relayed if link.channel == "iopub")
        # A blip while still waiting for IOPub's clients keeps waiting for all of them.
        self._iopub_expected = max(self._iopub_expected, iopub_clients)
        for link in relayed:
            link.close()
        for task in self._tasks:
            task.cancel()

    async def aclose(self) -> None:
        self.detach()
        servers, self._servers = self._servers, {}
        for server in servers.values():
            server.close()
        for links in self._held.values():
            for link in list(links):
                link.close()
        tasks = list(self._tasks)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for server in servers.values():
            with contextlib.suppress(OSError):
                await asyncio.wait_for(server.wait_closed(), 5.0)

    # -- called by links -----------------------------------------------------------------

    def accepted(self, link: _Link) -> None:
        if not self._servers:
            link.close()
        elif self._target is not None and (link.channel == "iopub" or self._gate_open):
            self._relay(link, self._target)
        else:
            held = self._held[link.channel]
            held.append(link)
            if len(held) > MAX_HELD_PER_PORT:
                held[0].close()

    def subscribed(self, link: _Link) -> None:
        self._iopub_subscribed += 1
        if not self._gate_open and self._iopub_subscribed >= self._iopub_expected:
            self._open_gate()

    def forget(self, link: _Link) -> None:
        self._relayed.discard(link)
        with contextlib.suppress(ValueError):
            self._held[link.channel].remove(link)

    # -- internals -----------------------------------------------------------------------

    def _open_gate(self) -> None:
        if self._gate_timer is not None:
            self._gate_timer.cancel()
            self._gate_timer = None
        if self._target is None or self._gate_open:
            return
        if self._iopub_subscribed < self._iopub_expected:
            log.info(
                "%d of %d IOPub clients back after %gs; relaying the other channels",
                self._iopub_subscribed, self._iopub_expected, IOPUB_FIRST_BOUND,
            )  # fmt: skip
        self._gate_open = True
        self._iopub_expected = 0
        for channel in CHANNELS:
            self._relay_held(channel)

    def _relay_held(self, channel: str) -> None:
        held, self._held[channel] = self._held[channel], []
        for link in held:
            if self._target is not None:
                self._relay(link, self._target)

    def _relay(self, link: _Link, target: Target) -> None:
        self._relayed.add(link)
        task = asyncio.ensure_future(link.relay(target))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
