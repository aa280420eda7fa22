"""What the relay holds for a stream's client, and what it drops past the budget.

Output the kernel sends while a client is away waits here, up to ``outage_buffer``
for all of a launcher's streams together; past it output messages are dropped whole (and
the client's user is told), every other message kept.  A slow client is not an away one:
it gets what a ZMQ socket gives a slow peer.
"""

import socket
import time
from typing import Any, Dict, List, Set

from .output import log
from .wire import StreamEnd
from .zmtp import (
    DROPPABLE_MESSAGES,
    GREETING_SIZE,
    HandshakeSkip,
    MessageCutter,
    execution_state,
    message_type,
    parent_of,
    stream_notice,
)

# While the client keeps up, the relay reads the kernel only this far ahead of what the
# client confirmed: past it the kernel's own socket waits (and drops by its high-water
# mark), exactly as without a relay.  A client that confirms nothing for STALL_AFTER
# seconds meanwhile is taken for a cut link not noticed yet: the relay reads on, into
# the outage buffer.
IN_FLIGHT_MAX = 8 * 1024 * 1024  # a 50 ms link at 80 MB/s: the SSH channel's window
STALL_AFTER = 2.0
# A client that confirms nothing while other clients of the same link do is slow, not
# cut off: it gets what a ZMQ socket gives a slow peer (the kernel's socket keeps what
# it does not read, and PUB drops past its high-water mark), never the outage buffer.
# Whatever the clients do, the streams together hold at most the budget (outage_buffer)
# plus a quarter of it for messages that are never dropped, plus FAIR_SHARE a stream:
# a client that keeps up always gets its share, however much the others hold.
FAIR_SHARE = 256 * 1024


class RelayStream(StreamEnd):
    """One client connection's stream: its connection to the kernel, what the client
    sent that the kernel has not taken yet, and (as a ``StreamEnd``) the kernel's output
    the client has not confirmed."""

    def __init__(
        self, sid: str, channel: str, kernel: socket.socket, answered: bool = False
    ) -> None:
        super().__init__()
        self.sid, self.channel, self.kernel = sid, channel, kernel
        self.to_kernel = bytearray()
        self.link: Any = None  # its RelayLink while a channel carries it
        self.left_at = 0.0
        self.kernel_eof = self.close_sent = self.reading_paused = False
        self.stalled = False  # the client confirmed nothing for STALL_AFTER while ahead
        self.progress_at = time.monotonic()  # the last confirmation, or the last pause
        # The provisioner answered the client's ZMTP handshake: the kernel's comes off
        self.skip = HandshakeSkip() if answered else None
        # libzmq drops what comes with the end of a greeting in one read: the client's
        # READY and first request wait here until the kernel has answered its greeting
        self.after_greeting = bytearray()
        self.greeting_taken = 0
        self.cutter = MessageCutter(greeted=answered) if channel == "iopub" else None
        self.deciding = False  # within a message that may be dropped: which type is it?
        self.undecided = bytearray()  # its start, until the type is known
        self.dropping = False  # within a message being dropped
        self.dropped_messages = self.dropped_bytes = 0
        self.parent = b"{}"
        self.last_parent = b"{}"  # of the last message kept
        self.busy = False  # the kernel's last status on this stream
        self.notices: List[str] = []  # for the next gap between messages
        self.notice_for_next_cell = ""  # shown while idle: shown again in the next cell

    def from_client(self, payload: bytes) -> None:
        """The client's bytes, for the kernel (its greeting alone first, see above)."""
        if self.skip is None or self.skip.greeted:
            self.to_kernel += payload
            return
        room = max(0, GREETING_SIZE - self.greeting_taken)
        self.to_kernel += payload[:room]
        self.after_greeting += payload[room:]
        self.greeting_taken += min(room, len(payload))

    def kernel_greeted(self) -> bool:
        """The kernel answered the greeting: what waited goes (True if anything did)."""
        if not self.after_greeting or (self.skip is not None and not self.skip.greeted):
            return False
        self.to_kernel += self.after_greeting
        self.after_greeting.clear()
        return True

    @property
    def waiting_for_kernel(self) -> int:
        return len(self.to_kernel) + len(self.after_greeting)

    @property
    def to_frame(self) -> bool:
        """Has the stream more for its link: data not framed yet, or its CLOSE?"""
        return self.unframed > 0 or (self.kernel_eof and not self.close_sent)


class Holding:
    """The relay's accounts of what its streams hold (a part of ``Relay``)."""

    bound: int  # outage_buffer
    headroom: int  # for messages never dropped, during an outage
    heard_at: float  # when a proven client's bytes last arrived: the link is up
    follow_parents: bool  # notices may come: follow each message's parent and status
    connection: Dict[str, Any]  # the kernel's connection info (its key)
    streams: Dict[str, RelayStream]
    at_limit: Set[str]  # streams whose pause at the limit was logged

    def watch(self, sock: socket.socket, owner: Any, read: bool, write: bool) -> None:
        raise NotImplementedError

    def flush(self, stream: RelayStream) -> None:
        raise NotImplementedError

    def held(self) -> int:
        """What the streams together hold for their clients: the launcher's budget."""
        return sum(len(s.unacked) + len(s.undecided) for s in self.streams.values())

    def in_outage(self, stream: RelayStream) -> bool:
        """Is this stream's client cut off (not merely slow)?  Its channel is gone, or
        it confirmed nothing for STALL_AFTER and neither did any other client."""
        if stream.link is None:
            return True
        return stream.stalled and time.monotonic() - self.heard_at > STALL_AFTER

    def can_drop(self, stream: RelayStream) -> bool:
        return stream.cutter is not None and not stream.cutter.opaque

    def room(self, stream: RelayStream) -> bool:
        """May the relay read more of the kernel's output for this stream?"""
        mine = len(stream.unacked) + len(stream.undecided)
        if mine < FAIR_SHARE:
            return True
        if not self.in_outage(stream):
            return mine < IN_FLIGHT_MAX and self.held() < self.bound
        if self.can_drop(stream):  # past the budget output is dropped, the rest kept
            return self.held() < self.bound + self.headroom
        return self.held() < self.bound

    def read_if_room(self, stream: RelayStream) -> None:
        if stream.reading_paused and not stream.kernel_eof and self.room(stream):
            stream.reading_paused = False
            self.watch(stream.kernel, stream, True, bool(stream.to_kernel))

    def take_from_kernel(self, stream: RelayStream, data: bytes) -> None:
        """Past the bound, output messages (stream, display data) are dropped whole;
        every other message (status, replies' results, errors, comms) is kept."""
        cutter = stream.cutter
        if cutter is None or cutter.opaque:
            stream.unacked += data
            return
        outage = self.in_outage(stream)
        others = self.held() - len(stream.unacked) - len(stream.undecided) if outage else 0
        for segment, starts, _, ends in cutter.feed(data):
            if starts and outage and others + len(stream.unacked) >= self.bound:
                stream.deciding = True
            if stream.deciding:
                stream.undecided += segment
                kind = message_type(cutter.frames)
                if kind is None and not ends:
                    continue
                stream.deciding = False
                stream.dropping = kind in DROPPABLE_MESSAGES
                segment, stream.undecided = bytes(stream.undecided), bytearray()
                starts = not stream.dropping
            if starts and stream.dropped_messages and not stream.dropping:
                # before the next message kept (an `idle`, say), while it still counts
                self.add_notice(stream)
            if stream.dropping:
                stream.dropped_bytes += len(segment)
                if ends:
                    stream.dropped_messages += 1
                    stream.dropping = False
                    stream.parent = parent_of(cutter.frames)
                continue
            stream.unacked += segment
            if ends:
                if self.follow_parents:  # only a kernel with notices to come pays for this
                    self.message_kept(stream, cutter.frames)
                self.notice_dropped(stream)

    def message_kept(self, stream: RelayStream, frames: List[bytes]) -> None:
        """Follow the parent and the busy/idle status, and add waiting notices."""
        stream.last_parent = parent_of(frames)
        state = execution_state(frames)
        if state is not None:
            stream.busy = state == "busy"
            if stream.busy and stream.notice_for_next_cell:
                stream.notices.append(stream.notice_for_next_cell)
                stream.notice_for_next_cell = ""
        for text in stream.notices:
            stream.unacked += stream_notice(self.connection, stream.last_parent, text)
        stream.notices = []

    def queue_notice(self, stream: RelayStream, text: str) -> None:
        """``text`` in the output of the cell running now (if none, of the last one, and
        again in the next one: a client shows output only for a cell it runs)."""
        if not stream.busy:
            stream.notice_for_next_cell = text
        cutter = stream.cutter
        if cutter is not None and cutter.between_messages and not stream.deciding:
            stream.unacked += stream_notice(self.connection, stream.last_parent, text)
            self.flush(stream)
        else:
            stream.notices.append(text)

    def notice_dropped(self, stream: RelayStream) -> None:
        """Once there is room again, between two messages: tell the client's user."""
        cutter = stream.cutter
        if not stream.dropped_messages or cutter is None or not cutter.between_messages:
            return
        if self.held() < self.bound:
            self.add_notice(stream)
            self.flush(stream)

    def add_notice(self, stream: RelayStream) -> None:
        text = (
            "\n[ssh-provisioner] %d output message(s), %d bytes, were dropped while the "
            "link to this kernel's host was down (more than outage_buffer = %d bytes "
            "waited for the client).\n"
        ) % (stream.dropped_messages, stream.dropped_bytes, self.bound)
        log(text.strip())
        stream.unacked += stream_notice(self.connection, stream.parent, text)
        stream.dropped_messages = stream.dropped_bytes = 0
