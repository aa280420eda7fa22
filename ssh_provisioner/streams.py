"""One client connection to a kernel's local port, relayed as a resumable stream.

The client's end of ``host/wire``: what the client sent stays here until the relay on
the host confirms it, so a channel lost with its SSH connection is replaced by a new
one without a byte lost or repeated.  ``tunnels.KernelPorts`` accepts the connections
and decides where and when each one is relayed.  (About 500 lines: the stream's
lifecycle, held -> opening -> open -> suspended -> closed, with spares and the local
ZMTP answer, is one object's state.)
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import asyncssh

from .host import wire, zmtp
from .host.wire import FRAME_ACK, FRAME_CLOSE, FRAME_DATA, StreamEnd
from .link import SSHLink
from .status import traffic
from .trips import trip

if TYPE_CHECKING:
    from .tunnels import KernelPorts

log = logging.getLogger(__name__)

LOCAL_ADDRESS = "127.0.0.1"
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
    answers_zmtp: bool = False  # a client's ZMTP handshake may be answered here (host/zmtp)
    host: str = ""  # the kernel's host, as the config names it (for the traffic metrics)


class PreambleWatch:
    """Where the first message starts in one direction of a ZMTP 3 stream: past the
    greeting and the handshake's commands (READY; CurveZMQ's HELLO, WELCOME, INITIATE),
    at the first message frame or MESSAGE command.  Until then all of it is preamble.

    Both gates of IOPub-first read it: a client's first message on the other channels
    waits (its handshake goes on), and the kernel's first message to an IOPub client
    says the kernel knows that subscriber."""

    GREETING = 64
    MAX_COMMAND = 64 * 1024  # past this, stop watching: count it as a message

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._offset = 0  # where ``_buffer`` starts in the client's stream
        self._greeted = False
        self.first_message: int | None = None  # its offset, once known

    def past_greeting(self) -> None:
        """The stream starts past the greeting and READY (they were taken off)."""
        self._greeted = True

    def allowed(self, sent: int) -> int:
        """How much of the ``sent`` bytes is preamble, which may go before the gate
        opens."""
        return sent if self.first_message is None else self.first_message

    def feed(self, data: bytes) -> None:
        if self.first_message is not None:
            return
        buffer = self._buffer
        buffer += data
        if not self._greeted:
            if len(buffer) < self.GREETING:
                return
            del buffer[: self.GREETING]
            self._offset += self.GREETING
            self._greeted = True
        while buffer:
            flags = buffer[0]
            if not flags & 0x04:  # a message frame
                self.first_message = self._offset
                return
            head = 9 if flags & 0x02 else 2
            if len(buffer) < head:
                return
            size = int.from_bytes(buffer[1:head], "big")
            if size > self.MAX_COMMAND:  # too big to wait for: count it as a message
                self.first_message = self._offset
                return
            if len(buffer) < head + size:
                return
            name = buffer[head + 1 : head + 1 + buffer[head]] if size else b""
            if name == b"MESSAGE":
                self.first_message = self._offset
                return
            del buffer[: head + size]
            self._offset += head + size


class _ChannelSide(asyncssh.SSHTCPSession[bytes]):
    """The SSH channel's end of a link (a TCP or Unix stream's session)."""

    def __init__(self, link: ClientStream) -> None:
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


class StreamState(enum.Enum):
    HELD = "held"  # accepted, waiting for a kernel to relay to
    OPENING = "opening"  # a channel to the relay is opening, or proving itself
    OPEN = "open"
    SUSPENDED = "suspended"  # the channel was lost; the relay keeps the stream
    CLOSED = "closed"


class ClientStream(asyncio.Protocol):
    """One accepted client connection, relayed as a resumable stream (see the launcher's
    relay): what the client sent stays here until the relay confirms it, so a channel
    lost with its SSH connection is replaced by a new one without a byte lost."""

    def __init__(self, ports: KernelPorts, channel: str) -> None:
        self._ports = ports
        self.channel = channel
        self.sid = secrets.token_hex(12)
        self.state = StreamState.HELD
        self._transport: asyncio.Transport | None = None
        self._side: _ChannelSide | None = None  # the current channel
        self._target: Target | None = None
        self._watch = PreambleWatch() if channel == "iopub" else None
        # While the ports' gate is closed (IOPub first), only the ZMTP handshake goes
        self._preamble = PreambleWatch() if channel in wire.CHANNELS else None
        self.gated = False
        self._answered = False  # the client gets the kernel's ZMTP handshake from here
        # A spare: relayed before any client connected (while the kernel starts), its
        # channel opened and proven; the next client of its port takes it.  Parked: its
        # data waits until the kernel is ready.
        self.spare = False
        self.parked = False
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
    def target(self) -> Target | None:
        return self._target

    @property
    def resumable(self) -> bool:
        """The relay may hold this stream: we proved ourselves to it once, so it may
        have created the stream and passed on what we sent."""
        return self._created and self.state is not StreamState.CLOSED

    # -- the client's side (asyncio.Protocol) --------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        if self._answered:  # a spare that promised the relay to answer the handshake
            self._transport.write(zmtp.kernel_handshake(self.channel))
        if self.spare:
            self.spare = False
            self._ports.took_spare(self)
        else:
            self._ports.accepted(self)

    def data_received(self, data: bytes) -> None:
        self._end.unacked += data
        if self._target is not None:
            traffic.add(self._target.host, "to_kernel", len(data))
        if self._preamble is not None:
            self._preamble.feed(data)
        if self.state is StreamState.OPEN:
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
        open_ = side is self._side and self.state is StreamState.OPEN
        if open_ and len(self._end.unacked) < CLIENT_BUFFER_LIMIT:
            self._resume_reading()

    async def relay(self, target: Target, resume: bool = False) -> None:
        """Open a channel to the relay and create (or resume) this stream there."""
        self._target, self._resume = target, resume
        self.state = StreamState.OPENING
        if not resume:
            if self._answered and not target.answers_zmtp:  # cannot be taken back
                self.close()
                return
            self._answer_zmtp(target)
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
            if self.state is StreamState.OPENING:  # (suspend() has dealt with it otherwise)
                self.close()
            raise
        trip(target.label, "stream open", self.channel)  # one per client connection, in parallel
        if self.state is not StreamState.OPENING or self._target is not target:
            side.channel.close()  # closed or suspended while the channel opened
            return
        self._side, self._inbuf, self._phase = side, bytearray(), "proof"
        self._nonce = wire.new_nonce()
        answered = self._answered and not resume
        hello = wire.hello(
            self._nonce, self.sid, self.channel, resume, self._end.received, answered
        )
        side.channel.write(wire.encode_line(hello))

    def _answer_zmtp(self, target: Target) -> None:
        """Say the kernel's ZMTP handshake to the client now (see host/zmtp), or as it
        connects (a spare): its first request then leaves with its own handshake, two
        round trips sooner."""
        if self._answered or not target.answers_zmtp or self._preamble is None:
            return
        if self._end.received or (self._transport is not None and self._transport.is_closing()):
            return
        self._answered = True
        if self._transport is not None:
            self._transport.write(zmtp.kernel_handshake(self.channel))
        if self._watch is not None:
            self._watch.past_greeting()  # the relay's stream starts at the first message

    def from_relay(self, side: _ChannelSide, data: bytes) -> None:
        if side is not self._side or self.state is StreamState.CLOSED:
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
            trip(target.label, "stream challenge", self.channel)
            side.channel.write(wire.encode_line(proof))
            self._created = True
            if self._resume:
                self._phase = "resumed"  # the relay says next how far it got
            else:
                self._opened()
            return True
        trip(target.label, "stream resume", self.channel)  # "resumed": how far it got
        if "error" in message:
            log.info("%s: %s stream not resumed: %s", target.label, self.channel, message["error"])
            self.close()
            return False
        self._confirm(int(message["received"]))
        if message.get("dropped_messages"):
            traffic.add(target.host, "dropped", int(message.get("dropped_bytes", 0)))
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
        self.state = StreamState.OPEN
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
                if payload == wire.NOT_LISTENING and not self._end.received:
                    self._not_listening()
                else:
                    self.close()  # the kernel closed its side
                return
        if self._end.ack_due:
            self._write(self._end.frame(FRAME_ACK))

    def _to_client(self, data: bytes) -> None:
        self._end.took(data)
        if self._watch is not None:
            self._watch.feed(data)
            if self._watch.first_message is not None:
                self._watch = None
                self._ports.subscribed(self)
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)
        if self._target is not None:
            traffic.add(self._target.host, "to_client", len(data))

    def _not_listening(self) -> None:
        """The relay could not connect this new stream to the kernel, which is ending:
        hold the client's connection, unanswered, for the kernel's next start."""
        side, self._side = self._side, None
        if side is not None and side.channel is not None:
            side.channel.close()
        self._created = False  # the relay never had it: a new stream on the next kernel
        self._end.rewind()
        self.state = StreamState.HELD
        self._ports.not_listening(self)

    def _confirm(self, received: int) -> None:
        confirmed = self._end.confirm(received)
        open_ = self.state is StreamState.OPEN
        if confirmed and open_ and len(self._end.unacked) < CLIENT_BUFFER_LIMIT:
            self._resume_reading()

    def _write(self, frame: bytes) -> None:
        if self._side is not None:
            self._side.channel.write(frame)

    def take_client(self, held: ClientStream) -> bool:
        """Carry ``held``'s client (connected while the kernel was away, nothing of it
        relayed yet) on this spare's proven channel; False if it cannot."""
        transport = held._transport
        fresh = not held._end.acked and not held._end.received and not held._created
        if not self.spare or transport is None or transport.is_closing() or not fresh:
            return False
        if held._answered and not self._answered:  # its client has the handshake already,
            return False  # and this relay would not take the kernel's off
        self.spare = False
        held._transport, held.state = None, StreamState.CLOSED
        held._ports.forget(held)
        self._end.unacked += held._end.unacked
        self._preamble, self._client_paused = held._preamble, held._client_paused
        self._transport = transport
        transport.set_protocol(self)
        if self._answered and not held._answered:
            transport.write(zmtp.kernel_handshake(self.channel))
        return True

    def unpark(self) -> None:
        """The kernel is ready: what the client sent may go."""
        if self.parked:
            self.parked = False
            if self.state is StreamState.OPEN:
                self._send_data()

    def _send_data(self) -> None:
        if self.parked:
            return
        end = self._end
        upto = None
        if self.gated and self._preamble is not None:
            upto = self._preamble.allowed(end.acked + len(end.unacked))
        while self._side is not None and end.unframed and (upto is None or end.sent < upto):
            self._write(end.next_data(upto))

    def ungate(self) -> None:
        """The kernel knows its IOPub clients now: the client's messages may go."""
        self.gated = False
        if self.state is StreamState.OPEN:
            self._send_data()

    def channel_lost(self, side: _ChannelSide) -> None:
        if side is self._side:
            self._lost()

    def _lost(self) -> None:
        """The channel is gone (or never came): the stream waits for the kernel's next
        connection, or ends with its client's connection."""
        if self.state is StreamState.CLOSED:
            return
        self._side = None
        if self._transport is None:  # a spare no client took: nothing to keep
            self.close()
            return
        if self.resumable:
            self.state = StreamState.SUSPENDED
            self._ports.suspended(self)
        else:  # no stream there yet: held again, for the kernel's next connection
            self.state = StreamState.HELD
            self._ports.hold(self)

    def suspend(self) -> None:
        """The kernel's connection is lost: keep the stream for a new channel (or, if
        the relay never had it, hold the connection again)."""
        if self.state is StreamState.CLOSED:
            return
        if self._transport is None:  # a spare no client took
            self.close()
            return
        side, self._side = self._side, None
        self.state = StreamState.SUSPENDED if self.resumable else StreamState.HELD
        if side is not None and side.channel is not None:
            side.channel.close()

    def close(self) -> None:
        if self.state is StreamState.CLOSED:
            return
        side, self._side = self._side, None
        if side is not None and side.channel is not None:
            if self._phase == "open":  # the relay closes the kernel's side
                with contextlib.suppress(OSError, asyncssh.Error):
                    side.channel.write(self._end.frame(FRAME_CLOSE))
            side.channel.close()
        self.state = StreamState.CLOSED
        if self._transport is not None:
            self._transport.close()
        self._ports.forget(self)
