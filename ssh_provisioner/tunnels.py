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
import enum
import logging
import secrets
import time
import weakref
from dataclasses import dataclass
from typing import Any, cast

import asyncssh

from .errors import TunnelError
from .host import wire
from .host.wire import CHANNELS, FRAME_ACK, FRAME_CLOSE, FRAME_DATA, StreamEnd
from .link import SSHLink

log = logging.getLogger(__name__)

LOCAL_ADDRESS = "127.0.0.1"
IOPUB_FIRST_BOUND = 1.5  # seconds other channels wait for IOPub's clients at most
MAX_HELD_PER_PORT = 32  # older held connections are closed (their clients reconnect)
# Connections a port relays at once (as the launcher's relay: STREAMS_PER_CHANNEL_MAX):
# another local user's flood of idle connections must not become as many SSH channels
# and launcher sockets.  Past it a new connection is closed, and the log says why.
MAX_LINKS_PER_PORT = 64
REFUSAL_LOG_INTERVAL = 60.0  # seconds between two log lines about refused connections
RESUMES_ALONE_MAX = 3
CLIENT_BUFFER_LIMIT = 1024 * 1024  # what a client may send unconfirmed before it waits
Endpoint = int | str  # a TCP port on the host's loopback, or a Unix socket path


@dataclass(frozen=True, eq=False)
class Target:
    """Where the kernel's channels are now: its launcher's relay, over one SSH
    connection.  ``launcher`` names the launcher (streams resume only on the one that
    holds them); ``token`` is what both ends prove they know; ``label`` is for logs."""

    connection: SSHLink
    relay: Endpoint
    token: str
    launcher: str
    label: str
    relay_host: str = LOCAL_ADDRESS  # where the relay's TCP port listens, as the host sees it


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


class _ChannelSide(asyncssh.SSHTCPSession[bytes]):
    """The SSH channel's end of a link (a TCP or Unix stream's session)."""

    def __init__(self, link: _Link) -> None:
        self._link = link
        self.channel: Any = None

    def connection_made(self, chan: Any) -> None:
        self.channel = chan

    def data_received(self, data: bytes, datatype: int | None) -> None:
        self._link.from_relay(self, data)

    def eof_received(self) -> bool:
        return False  # the channel closes; the stream is resumed or ends (CLOSE frame)

    def connection_lost(self, exc: Exception | None) -> None:
        self._link.channel_lost(self)

    def pause_writing(self) -> None:
        self._link.pause_client(self)

    def resume_writing(self) -> None:
        self._link.resume_client(self)


class LinkState(enum.Enum):
    HELD = "held"  # accepted, waiting for a kernel to relay to
    OPENING = "opening"  # a channel to the relay is opening, or proving itself
    OPEN = "open"
    SUSPENDED = "suspended"  # the channel was lost; the relay keeps the stream
    CLOSED = "closed"


class _Link(asyncio.Protocol):
    """One accepted client connection, relayed as a resumable stream (see the launcher's
    relay): what the client sent stays here until the relay confirms it, so a channel
    lost with its SSH connection is replaced by a new one without a byte lost."""

    def __init__(self, ports: KernelPorts, channel: str) -> None:
        self._ports = ports
        self.channel = channel
        self.sid = secrets.token_hex(12)
        self.state = LinkState.HELD
        self._transport: asyncio.Transport | None = None
        self._side: _ChannelSide | None = None  # the current channel
        self._target: Target | None = None
        self._watch = FirstMessageWatch() if channel == "iopub" else None
        # client -> kernel bytes the relay has not confirmed; kernel -> client passed on
        self._end = StreamEnd()
        self._inbuf = bytearray()
        self._phase = ""  # of the current channel: "proof" -> ("resumed") -> "open"
        self._nonce = ""
        self._client_paused = False
        self._created = False  # the relay may hold the stream
        self._open_failed = False  # the last channel to the relay did not open
        self.resumes_alone = 0  # resumes since the last attach, without a new connection
        self._resume = False  # the current channel resumes the stream

    @property
    def resumable(self) -> bool:
        """The relay may hold this stream: we proved ourselves to it once, so it may
        have created the stream and passed on what we sent."""
        return self._created and self.state is not LinkState.CLOSED

    # -- the client's side (asyncio.Protocol) --------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._ports.accepted(self)

    def data_received(self, data: bytes) -> None:
        self._end.unacked += data
        if self.state is LinkState.OPEN:
            self._send_data()
        if len(self._end.unacked) >= CLIENT_BUFFER_LIMIT:
            self._pause_reading()

    def eof_received(self) -> bool:
        self.close()  # ZMQ peers close both ways; the relay then closes the kernel's side
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()

    def pause_writing(self) -> None:
        if self._side is not None and self._side.channel is not None:
            self._side.channel.pause_reading()

    def resume_writing(self) -> None:
        if self._side is not None and self._side.channel is not None:
            self._side.channel.resume_reading()

    def _pause_reading(self) -> None:
        if not self._client_paused and self._transport is not None:
            self._client_paused = True
            self._transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._client_paused and self._transport is not None and not self._transport.is_closing():
            self._client_paused = False
            self._transport.resume_reading()

    # -- the relay's side ----------------------------------------------------------------

    def pause_client(self, side: _ChannelSide) -> None:
        if side is self._side:
            self._pause_reading()

    def resume_client(self, side: _ChannelSide) -> None:
        open_ = side is self._side and self.state is LinkState.OPEN
        if open_ and len(self._end.unacked) < CLIENT_BUFFER_LIMIT:
            self._resume_reading()

    async def relay(self, target: Target, resume: bool = False) -> None:
        """Open a channel to the relay and create (or resume) this stream there."""
        self._target, self._resume = target, resume
        self.state = LinkState.OPENING
        side: _ChannelSide
        try:
            if isinstance(target.relay, str):
                side = await target.connection.open_unix(lambda: _ChannelSide(self), target.relay)
            else:
                side = await target.connection.open_tcp(
                    lambda: _ChannelSide(self), target.relay_host, target.relay
                )
        except (asyncssh.Error, OSError) as exc:
            log.debug("%s: cannot reach the relay of %s: %s", self.channel, target.label, exc)
            self._open_failed = True
            self._lost()
            return
        except BaseException:
            if self.state is LinkState.OPENING:  # (suspend() has dealt with it otherwise)
                self.close()
            raise
        if self.state is not LinkState.OPENING or self._target is not target:
            side.channel.close()  # closed or suspended while the channel opened
            return
        self._side, self._inbuf, self._phase = side, bytearray(), "proof"
        self._nonce = wire.new_nonce()
        hello = wire.hello(self._nonce, self.sid, self.channel, resume, self._end.received)
        side.channel.write(wire.encode_line(hello))

    def from_relay(self, side: _ChannelSide, data: bytes) -> None:
        if side is not self._side or self.state is LinkState.CLOSED:
            return
        self._inbuf += data
        try:
            while self._phase != "open":
                message = wire.take_line(self._inbuf)
                if message is None or not self._handshake(side, message):
                    return
            self._read_frames()
        except wire.ProtocolError as exc:
            self._refuse(str(exc))

    def _handshake(self, side: _ChannelSide, message: dict[str, Any]) -> bool:
        target = self._target
        if target is None:
            return False
        if self._phase == "proof":
            if "error" in message and "proof" not in message:  # e.g. too many streams
                self._ports.refused(self, f"the relay refused it: {message['error']}")
                return False
            try:
                proof = wire.answer(target.token, "relay", self._nonce, message)
            except wire.ProtocolError:
                self._refuse("a relay that cannot prove it knows the kernel's token")
                return False
            side.channel.write(wire.encode_line(proof))
            self._created = True
            if self._resume:
                self._phase = "resumed"  # the relay says next how far it got
            else:
                self._opened()
            return True
        # "resumed": the relay says how far it got
        if "error" in message:
            log.info("%s: %s stream not resumed: %s", target.label, self.channel, message["error"])
            self.close()
            return False
        self._confirm(int(message["received"]))
        if message.get("dropped_messages"):
            log.warning(
                "%s: %d IOPub message(s) (%d bytes) were dropped while unreachable: more "
                "than outage_buffer waited for the client",
                target.label, message["dropped_messages"], message.get("dropped_bytes", 0),
            )  # fmt: skip
        self._opened()
        return True

    @property
    def may_resume_alone(self) -> bool:
        """Resume on the same connection after losing the channel alone: a few times,
        never after a channel failed to open (that waits for the next connection)."""
        return not self._open_failed and self.resumes_alone < RESUMES_ALONE_MAX

    def _opened(self) -> None:
        self._open_failed = False
        self._phase = "open"
        self.state = LinkState.OPEN
        self._end.rewind()
        self._send_data()
        if len(self._end.unacked) < CLIENT_BUFFER_LIMIT:
            self._resume_reading()

    def _refuse(self, why: str) -> None:
        label = self._target.label if self._target is not None else "the kernel"
        log.error("%s: closed the %s connection: %s", label, self.channel, why)
        self.close()

    def _read_frames(self) -> None:
        for kind, acknowledged, payload in wire.take_frames(self._inbuf):
            self._confirm(acknowledged)
            if kind == FRAME_DATA:
                self._to_client(payload)
            elif kind == FRAME_CLOSE:
                self.close()  # the kernel closed its side
                return
        if self._end.ack_due:
            self._write(self._end.frame(FRAME_ACK))

    def _to_client(self, data: bytes) -> None:
        self._end.took(data)
        if self._watch is not None and self._watch.feed(data):
            self._watch = None
            self._ports.subscribed(self)
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _confirm(self, received: int) -> None:
        confirmed = self._end.confirm(received)
        open_ = self.state is LinkState.OPEN
        if confirmed and open_ and len(self._end.unacked) < CLIENT_BUFFER_LIMIT:
            self._resume_reading()

    def _write(self, frame: bytes) -> None:
        if self._side is not None:
            self._side.channel.write(frame)

    def _send_data(self) -> None:
        while self._side is not None and self._end.unframed:
            self._write(self._end.next_data())

    def channel_lost(self, side: _ChannelSide) -> None:
        if side is self._side:
            self._lost()

    def _lost(self) -> None:
        """The channel is gone (or never came): the stream waits for the kernel's next
        connection, or ends with its client's connection."""
        if self.state is LinkState.CLOSED:
            return
        self._side = None
        if self.resumable:
            self.state = LinkState.SUSPENDED
            self._ports.suspended(self)
        else:  # no stream there yet: held again, for the kernel's next connection
            self.state = LinkState.HELD
            self._ports.hold(self)

    def suspend(self) -> None:
        """The kernel's connection is lost: keep the stream for a new channel (or, if
        the relay never had it, hold the connection again)."""
        if self.state is LinkState.CLOSED:
            return
        side, self._side = self._side, None
        self.state = LinkState.SUSPENDED if self.resumable else LinkState.HELD
        if side is not None and side.channel is not None:
            side.channel.close()

    def close(self) -> None:
        if self.state is LinkState.CLOSED:
            return
        side, self._side = self._side, None
        if side is not None and side.channel is not None:
            if self._phase == "open":  # the relay closes the kernel's side
                with contextlib.suppress(OSError, asyncssh.Error):
                    side.channel.write(self._end.frame(FRAME_CLOSE))
            side.channel.close()
        self.state = LinkState.CLOSED
        if self._transport is not None:
            self._transport.close()
        self._ports.forget(self)


_OPEN_PORTS: weakref.WeakSet[KernelPorts] = weakref.WeakSet()


async def close_open_ports() -> None:
    """Unbind every kernel's local ports (the engine closes: its loop serves them)."""
    await asyncio.gather(*(ports.aclose() for ports in list(_OPEN_PORTS)), return_exceptions=True)


class KernelPorts:
    """The kernel's local ports and the links accepted on them.

    ``relay_to(target)`` points them at a kernel.  ``suspend()`` says its connection was
    lost: links keep their streams and resume when the same launcher is attached again.
    ``detach()`` takes the kernel away for good (restart, shutdown): links close, their
    clients reconnect and are held.  ``aclose()`` unbinds.  Runs on the engine's loop."""

    def __init__(self) -> None:
        self._servers: dict[str, asyncio.Server] = {}
        self._held: dict[str, list[_Link]] = {channel: [] for channel in CHANNELS}
        self._relayed: set[_Link] = set()
        self._suspended: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._target: Target | None = None
        self._launcher = ""  # the launcher that holds the suspended links' streams
        self._gate_open = False
        self._gate_timer: asyncio.TimerHandle | None = None
        self._iopub_expected = 0
        self._iopub_subscribed = 0
        self._refusals_logged: dict[str, float] = {}  # channel: when

    @classmethod
    async def open(cls, preferred: dict[str, int] | None = None) -> KernelPorts:
        """Bind the five ports: ``preferred`` ones where free (a kernel taken over from
        another process keeps its ports), new ones otherwise."""
        ports = cls()
        loop = asyncio.get_running_loop()
        _OPEN_PORTS.add(ports)
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

    def relay_to(self, target: Target) -> None:
        """Relay to ``target`` from now on.  Suspended links resume on the launcher that
        holds their streams.  New links: IOPub first, the rest once the kernel has sent
        IOPub's clients a message (so it knows them as subscribers)."""
        suspended, self._suspended = self._suspended, set()
        if target.launcher != self._launcher:
            for link in suspended:
                link.close()
            suspended = set()
        self._target, self._launcher = target, target.launcher
        for link in suspended:
            link.resumes_alone = 0
            self._relay(link, target, resume=True)
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

    def suspend(self) -> None:
        """The kernel's connection is lost: its links keep their streams (the relay on
        the host keeps its side), and new links are held."""
        self._target = None
        self._close_gate()
        for task in self._tasks:
            task.cancel()
        for link in list(self._relayed):
            link.suspend()
            self._relayed.discard(link)
            if link.state is LinkState.SUSPENDED:
                self._suspended.add(link)
            elif link.state is LinkState.HELD:
                self.hold(link)

    def detach(self) -> None:
        """The kernel is gone for good: close its links; new ones are held."""
        self._target = None
        self._close_gate()
        links = [*self._relayed, *self._suspended]
        iopub_clients = sum(1 for link in links if link.channel == "iopub")
        # A kernel gone while still waiting for IOPub's clients keeps waiting for all of them.
        self._iopub_expected = max(self._iopub_expected, iopub_clients)
        for link in links:
            link.close()
        self._suspended.clear()
        self._launcher = ""
        for task in self._tasks:
            task.cancel()

    async def aclose(self) -> None:
        _OPEN_PORTS.discard(self)
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
        elif self._links_on(link.channel) >= MAX_LINKS_PER_PORT:
            self.refused(link, f"the port already relays {MAX_LINKS_PER_PORT} connections")
        elif self._target is not None and (link.channel == "iopub" or self._gate_open):
            self._relay(link, self._target)
        else:
            self.hold(link)

    def _links_on(self, channel: str) -> int:
        live = self._relayed | self._suspended
        return len(self._held[channel]) + sum(1 for link in live if link.channel == channel)

    def refused(self, link: _Link, why: str) -> None:
        """Close a connection the kernel's side cannot take: said once a minute per port
        (a flood of connections must not flood the log too)."""
        now = time.monotonic()
        if now - self._refusals_logged.get(link.channel, -REFUSAL_LOG_INTERVAL) >= (
            REFUSAL_LOG_INTERVAL
        ):
            self._refusals_logged[link.channel] = now
            label = self._target.label if self._target is not None else "the kernel"
            log.error("%s: refused a new %s connection: %s", label, link.channel, why)
        link.close()

    def hold(self, link: _Link) -> None:
        self._relayed.discard(link)
        held = self._held[link.channel]
        held.append(link)
        if len(held) > MAX_HELD_PER_PORT:
            held[0].close()

    def subscribed(self, link: _Link) -> None:
        self._iopub_subscribed += 1
        if not self._gate_open and self._iopub_subscribed >= self._iopub_expected:
            self._open_gate()

    def suspended(self, link: _Link) -> None:
        """A link lost its channel on its own (not with the connection): it resumes on
        the current target once; a stream the relay no longer has then ends."""
        self._relayed.discard(link)
        target = self._target
        if target is not None and not target.connection.is_closed() and link.may_resume_alone:
            link.resumes_alone += 1
            self._relay(link, target, resume=True)
        else:
            self._suspended.add(link)

    def forget(self, link: _Link) -> None:
        self._relayed.discard(link)
        self._suspended.discard(link)
        with contextlib.suppress(ValueError):
            self._held[link.channel].remove(link)

    # -- internals -----------------------------------------------------------------------

    def _close_gate(self) -> None:
        self._gate_open = False
        if self._gate_timer is not None:
            self._gate_timer.cancel()
            self._gate_timer = None

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

    def _relay(self, link: _Link, target: Target, resume: bool = False) -> None:
        self._relayed.add(link)
        task = asyncio.ensure_future(link.relay(target, resume))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
