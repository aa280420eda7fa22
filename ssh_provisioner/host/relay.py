"""The relay: client connections that outlive a lost SSH connection.

The host's end of the resumable streams (see ``wire``): one thread serves every stream
of the kernel with a selector.  What a stream holds for a client that is away, and what
is dropped past the launcher's budget, is ``holding``'s part.

Why this module is over 500 lines: it is one class, ``Relay``, whose methods are one
selector loop's handlers and share its state without a lock (its docstring says why it
stays whole); the protocol, the holding and the bridge already live elsewhere.
"""

import errno
import os
import socket
import threading
import time
from typing import Any, Dict, List, Optional, Set, Tuple

from .bridge import bridge
from .holding import STALL_AFTER, Holding, RelayStream
from .output import log
from .spec import MIN_OUTAGE_BUFFER, LaunchSpec
from .wire import (
    CHANNELS,
    FRAME_ACK,
    FRAME_CLOSE,
    FRAME_DATA,
    LAUNCHER_CHANNEL,
    ProtocolError,
    challenge,
    encode_line,
    not_listening_frame,
    proven,
    take_frames,
    take_line,
)

# Anyone on the host may connect to a relay on TCP: connections that have not proven
# the token yet are few (the oldest goes first) and short-lived, and streams per kernel
# channel are capped, so that no flood takes the launcher to its descriptor limit.
HANDSHAKE_TIMEOUT = 5.0
UNPROVEN_MIN, UNPROVEN_MAX = 64, 1024  # a quarter of the descriptor limit, within these
STREAMS_PER_CHANNEL_MAX = 64
ACCEPT_BACKOFF = 0.2  # out of descriptors: the listener stays readable; wait, don't spin
LINK_OUTPUT_HIGH = 256 * 1024  # frame more of the stream once the channel took this in
TO_KERNEL_HIGH = 1024 * 1024  # stop reading the channel while the kernel lags this much


class RelayLink:
    """One SSH channel's connection to the relay."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.phase = "hello"  # -> "proof" -> ("proven": no stream until its first data) -> "open"
        self.hello: Dict[str, Any] = {}
        self.nonce = ""
        self.stream: Optional[RelayStream] = None
        self.since = time.monotonic()
        self.closing = False


def receive(sock: socket.socket) -> Optional[bytes]:
    """What a non-blocking socket has: None if nothing yet, b"" once closed or failed."""
    try:
        return sock.recv(65536)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""


def send_from(sock: socket.socket, buffer: bytearray) -> bool:
    """Send what a non-blocking socket takes of ``buffer`` now, and remove it from
    ``buffer``; False if the socket failed."""
    try:
        sent = sock.send(buffer)
    except (BlockingIOError, InterruptedError):
        return True
    except OSError:
        return False
    del buffer[:sent]
    return True


class Relay(Holding):
    """Serves resumable streams to the kernel's endpoints, on one thread (selectors).

    Why one class of this size: its methods are one selector loop's handlers, which
    share that loop's streams, links and budget without a lock.  What it holds for away
    clients and drops past the budget is holding.py's; the stream protocol is wire.py's."""

    def __init__(
        self, spec: LaunchSpec, transport: str, endpoints: Dict[str, Any], runtime_dir: str
    ) -> None:
        import selectors

        self.token = spec.attach_token
        self.connection = spec.connection
        self.transport, self.endpoints = transport, endpoints
        self.bound = max(MIN_OUTAGE_BUFFER, spec.outage_buffer)
        self.headroom = self.bound // 4
        self.heard_at = 0.0
        self.accept_resumes_at: Optional[float] = None
        self.at_limit: Set[str] = set()  # streams whose pause at the limit was logged
        self.refusals_logged: Dict[str, float] = {}  # channel: when
        self.unproven_max = UNPROVEN_MIN
        self.linger = spec.stream_linger
        self.streams: Dict[str, RelayStream] = {}
        self.links: Set[RelayLink] = set()
        self.selector = selectors.DefaultSelector()
        self.read_event, self.write_event = selectors.EVENT_READ, selectors.EVENT_WRITE
        self.control_path = ""  # the launcher's, for LAUNCHER_CHANNEL
        self.bridges: List[threading.Event] = []  # set: all the launcher said is out
        self.host = ""  # the relay's TCP address, when it listens on TCP
        notice = spec.walltime_notice or {}
        self.notice_text = str(notice.get("text") or "")
        self.notice_at = time.monotonic() + float(notice.get("after") or 0) if notice else None
        # Only a kernel with notices to come pays for following IOPub's parents.
        self.follow_parents = bool(self.notice_text) or spec.watch_ports
        self.posted: List[str] = []  # notices from the client (list.append: thread-safe)
        # The ports the kernel opened on its own ("tcp:6006": where to reach it), set
        # by the supervisor: a proven client's stream may go to these too.
        self.forwardable: Dict[str, Tuple[str, int]] = {}
        # With the NULL mechanism the provisioner may answer a client's ZMTP handshake
        # itself (see zmtp): the relay then takes the kernel's off the stream.
        curve = spec.connection.get("curve_secretkey")
        self.answers_zmtp = not curve
        # A client through an OpenSSH master before 9.4 has no way to a Unix socket.
        if (spec.relay_transport or transport) == "ipc":
            self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            path = os.path.join(runtime_dir, "relay")
            old_umask = os.umask(0o177)
            try:
                self.server.bind(path)
            finally:
                os.umask(old_umask)
            self.address: Any = path
        else:
            # On a Slurm compute node the login node reaches the relay over the cluster
            # network ("relay_bind"): the relay admits no one who cannot prove the token.
            bind = spec.relay_bind
            family, _, _, _, sockaddr = socket.getaddrinfo(
                bind, 0, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICSERV
            )[0]
            self.server = socket.socket(family, socket.SOCK_STREAM)
            self.server.bind(sockaddr)
            self.host = self.server.getsockname()[0]
            self.address = self.server.getsockname()[1]
        self.server.listen(64)
        self.server.setblocking(False)
        self.selector.register(self.server, self.read_event, self)
        self.running = True
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Stop within a second; every socket of the relay is closed then."""
        self.running = False

    def post_notice(self, text: str) -> None:
        """``text`` for the output of the cell running now, within a second (any thread)."""
        self.posted.append(text)

    # -- the loop ----------------------------------------------------------------------

    def run(self) -> None:
        try:
            self.serve()
        finally:
            for stream in list(self.streams.values()):
                self.end_stream(stream)
            for link in list(self.links):
                self.drop_link(link)
            self.selector.close()
            self.server.close()

    def serve(self) -> None:
        while self.running:
            wait = 1.0 if self.accept_resumes_at is None else ACCEPT_BACKOFF
            for key, mask in self.selector.select(timeout=wait):
                owner = key.data
                try:
                    if owner is self:
                        self.accept()
                    elif isinstance(owner, RelayLink):
                        if mask & self.write_event:
                            self.link_writable(owner)
                        if mask & self.read_event and owner in self.links:
                            self.link_readable(owner)
                    else:
                        if mask & self.write_event:
                            self.kernel_writable(owner)
                        if mask & self.read_event and owner.sid in self.streams:
                            self.kernel_readable(owner)
                except Exception as exc:  # one stream's fault must not end the others
                    log("relay: %s: %s" % (type(exc).__name__, exc))
                    if isinstance(owner, RelayLink):
                        self.drop_link(owner)
                    elif isinstance(owner, RelayStream):
                        self.end_stream(owner)
            self.expire(time.monotonic())

    def watch(self, sock: socket.socket, owner: Any, read: bool, write: bool) -> None:
        if sock.fileno() < 0:  # closed on the way here
            return
        events = (self.read_event if read else 0) | (self.write_event if write else 0)
        try:
            current = self.selector.get_key(sock).events
        except (KeyError, ValueError):
            current = None
        if not events:
            if current is not None:
                self.selector.unregister(sock)
        elif current is None:
            self.selector.register(sock, events, owner)
        elif current != events:
            self.selector.modify(sock, events, owner)

    def accept(self) -> None:
        try:
            sock, _ = self.server.accept()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                if self.accept_resumes_at is None:
                    log("relay: cannot accept a connection (%s); retrying" % exc.strerror)
                self.watch(self.server, self, False, False)
                self.accept_resumes_at = time.monotonic() + ACCEPT_BACKOFF
            return
        unproven = [link for link in self.links if link.phase in ("hello", "proof")]
        if len(unproven) >= self.unproven_max:
            # A flood: the oldest silent connection makes room (a real client speaks
            # within a round trip of connecting), else the oldest of all.
            silent = [link for link in unproven if link.phase == "hello" and not link.inbuf]
            self.drop_link(min(silent or unproven, key=lambda link: link.since))
        sock.setblocking(False)
        if sock.family == socket.AF_INET:  # small frames must not wait for an ACK (Nagle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = RelayLink(sock)
        self.links.add(link)
        self.watch(sock, link, True, False)

    def expire(self, now: float) -> None:
        if self.accept_resumes_at is not None and now >= self.accept_resumes_at:
            self.accept_resumes_at = None
            self.watch(self.server, self, True, False)
        if self.notice_at is not None and now >= self.notice_at:
            self.notice_at = None
            self.posted.append(self.notice_text)
        while self.posted:
            text = self.posted.pop(0)
            log(text.strip())
            for stream in self.streams.values():
                if stream.cutter is not None:
                    self.queue_notice(stream, text)
        for link in list(self.links):
            if link.phase in ("hello", "proof") and now - link.since > HANDSHAKE_TIMEOUT:
                self.drop_link(link)
        for stream in list(self.streams.values()):
            quiet = now - stream.progress_at > STALL_AFTER
            if stream.link is not None and stream.reading_paused and quiet:
                stream.stalled = True  # slow, or cut off: in_outage() tells which
                self.read_if_room(stream)
            if stream.link is None and now - stream.left_at > self.linger:
                log(
                    "relay: %s stream %s not resumed within %gs; closed"
                    % (stream.channel, stream.sid, self.linger)
                )
                self.end_stream(stream)

    # -- channels ----------------------------------------------------------------------

    def link_readable(self, link: RelayLink) -> None:
        data = receive(link.sock)
        if data is None:
            return
        if not data:
            self.drop_link(link)
            return
        link.inbuf += data
        if link.phase == "open":
            self.heard_at = time.monotonic()
        while link in self.links and link.phase not in ("open", "proven"):
            try:
                message = take_line(link.inbuf)
            except ProtocolError:
                self.drop_link(link)
                return
            if message is None:
                return
            self.handshake(link, message)
        if link in self.links and link.phase == "proven" and link.inbuf:
            self.create_stream(link)
        if link in self.links and link.stream is not None:
            self.read_frames(link, link.stream)

    def handshake(self, link: RelayLink, message: Dict[str, Any]) -> None:
        if link.phase == "hello":
            channel = str(message.get("channel"))
            if not message.get("resume") and self.stream_count(channel) >= STREAMS_PER_CHANNEL_MAX:
                now = time.monotonic()
                if now - self.refusals_logged.get(channel, -60.0) >= 60.0:  # once a minute
                    self.refusals_logged[channel] = now
                    log(
                        "relay: refused a new %s connection: the kernel's %s port already "
                        "has %d streams (the most it relays)"
                        % (channel, channel, STREAMS_PER_CHANNEL_MAX)
                    )
                link.closing = True
                self.send_line(link, {"error": "too many %s connections" % channel})
                return
            link.hello = message
            link.nonce, reply = challenge(self.token, "relay", message)
            self.send_line(link, reply)
            link.phase = "proof"
            return
        hello = link.hello
        if not proven(self.token, hello, link.nonce, message):
            log("relay: refused a connection that could not prove it knows the token")
            self.drop_link(link)
            return
        sid, channel = str(hello["stream"]), str(hello["channel"])
        if channel == LAUNCHER_CHANNEL:
            self.hand_to_launcher(link)
            return
        if hello.get("resume"):
            stream = self.streams.get(sid)
            if stream is None or stream.channel != channel:
                link.closing = True
                self.send_line(link, {"error": "no such stream here (ended or expired)"})
                return
            if stream.link is not None:
                self.drop_link(stream.link)
            self.send_line(
                link,
                {
                    "received": stream.received,
                    "dropped_messages": stream.dropped_messages,
                    "dropped_bytes": stream.dropped_bytes,
                },
            )
            stream.told = stream.received
            self.acknowledge(stream, int(hello.get("received") or 0))
        else:
            if sid in self.streams or channel not in CHANNELS + tuple(self.forwardable):
                self.drop_link(link)
                return
            # Proven: a kernel channel's stream starts with its first data (the client
            # may prove a channel while the kernel starts, before a client connected; a
            # ZMQ peer always speaks first).  A port the kernel opened may be a server
            # that speaks first: connected now.
            link.phase = "proven"
            if link.inbuf or channel not in CHANNELS:
                self.create_stream(link)
            return
        self.attach_link(link, stream)

    def create_stream(self, link: RelayLink) -> None:
        """A proven link's first data is in: connect its stream to the kernel."""
        hello = link.hello
        sid, channel = str(hello["stream"]), str(hello["channel"])
        if sid in self.streams or (
            channel not in self.endpoints and channel not in self.forwardable
        ):
            self.drop_link(link)  # (a kernel channel before the kernel listened: never)
            return
        try:
            kernel = self.connect_kernel(channel)
        except OSError:  # not listening: the kernel is ending
            link.outbuf += not_listening_frame()
            link.closing = True
            link.phase = "open"
            self.link_writable(link)
            return
        answered = bool(hello.get("zmtp_answered")) and self.answers_zmtp
        stream = RelayStream(sid, channel, kernel, answered)
        self.streams[sid] = stream
        self.watch(stream.kernel, stream, True, False)
        self.attach_link(link, stream)

    def attach_link(self, link: RelayLink, stream: RelayStream) -> None:
        link.phase = "open"
        link.stream = stream
        stream.link = link
        stream.rewind()
        self.flush(stream)

    def hand_to_launcher(self, link: RelayLink) -> None:
        """From now on this channel carries raw bytes to and from the launcher's control
        socket, which runs its own challenge-response: the supervision channel of a
        client that holds no session (an OpenSSH master's sessions count against the
        server's MaxSessions, and it has no Unix-socket forwarding before 9.4)."""
        self.links.discard(link)
        self.watch(link.sock, link, False, False)
        if not self.control_path:
            link.sock.close()
            return
        args = (link.sock, self.control_path, bytes(link.outbuf), bytes(link.inbuf))
        passed_on = threading.Event()
        self.bridges.append(passed_on)
        threading.Thread(target=bridge, args=(*args, passed_on), daemon=True).start()

    def connect_kernel(self, channel: str) -> socket.socket:
        if channel in self.forwardable:  # a port the kernel opened (a dashboard)
            try:
                sock = socket.create_connection(self.forwardable[channel], timeout=5)
            except OSError as exc:
                # Closed since it was reported: the client's connection ends at once,
                # as a refused one does (a stream whose other end is at EOF).
                log("relay: %s: %s" % (channel, exc))
                sock, gone = socket.socketpair()
                gone.close()
            sock.setblocking(False)
            return sock
        endpoint = self.endpoints[channel]
        if self.transport == "ipc":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(endpoint)
            except OSError:
                sock.close()
                raise
        else:
            sock = socket.create_connection(("127.0.0.1", endpoint), timeout=5)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        return sock

    def send_line(self, link: RelayLink, message: Dict[str, Any]) -> None:
        link.outbuf += encode_line(message)
        self.link_writable(link)

    def read_frames(self, link: RelayLink, stream: RelayStream) -> None:
        for kind, acknowledged, payload in take_frames(link.inbuf):
            self.acknowledge(stream, acknowledged)
            if kind == FRAME_DATA:
                stream.from_client(payload)
                stream.took(payload)
                if stream.ack_due:
                    link.outbuf += stream.frame(FRAME_ACK)
            elif kind == FRAME_CLOSE:
                self.end_stream(stream)
                return
        if stream.to_kernel:
            self.kernel_writable(stream)
        # The kernel lags: leave the rest in the channel (SSH's window pushes back).
        reading = stream.waiting_for_kernel < TO_KERNEL_HIGH
        self.watch(link.sock, link, reading, bool(link.outbuf))

    def acknowledge(self, stream: RelayStream, received: int) -> None:
        if stream.confirm(received):
            stream.progress_at, stream.stalled = time.monotonic(), False
            self.at_limit.discard(stream.sid)
            self.read_if_room(stream)
            self.notice_dropped(stream)

    def flush(self, stream: RelayStream) -> None:
        """Frame what the link has not carried yet, as far as it takes it in."""
        link = stream.link
        if link is None or link.phase != "open":
            return
        while stream.unframed and len(link.outbuf) < LINK_OUTPUT_HIGH:
            stream.next_data_into(link.outbuf)
        if stream.kernel_eof and not stream.unframed and not stream.close_sent:
            link.outbuf += stream.frame(FRAME_CLOSE)
            stream.close_sent = True
        self.link_writable(link)

    def link_writable(self, link: RelayLink) -> None:
        if link not in self.links:
            return
        if link.outbuf and not send_from(link.sock, link.outbuf):
            self.drop_link(link)
            return
        stream = link.stream
        room = len(link.outbuf) < LINK_OUTPUT_HIGH
        if stream is not None and stream.link is link and stream.to_frame and room:
            self.flush(stream)  # frames more, and is back here
            return
        if link.closing and not link.outbuf:
            self.drop_link(link)
            return
        reading = stream is None or stream.waiting_for_kernel < TO_KERNEL_HIGH
        self.watch(link.sock, link, reading, bool(link.outbuf))
        # A stream whose CLOSE went out ends when the client answers with its own (and
        # its count of what it got), not here: the channel may yet be lost with the
        # tail of the stream in it, which a resume must send again.

    def drop_link(self, link: RelayLink) -> None:
        if link not in self.links:
            return
        self.links.discard(link)
        self.watch(link.sock, link, False, False)
        link.sock.close()
        stream = link.stream
        if stream is not None and stream.link is link:
            stream.link = None
            if stream.close_sent and not stream.unacked:
                self.end_stream(stream)  # the client got it all, and the CLOSE with it
                return
            stream.rewind()
            stream.close_sent = False  # what was not confirmed goes out again, then CLOSE
            stream.left_at = time.monotonic()
            self.read_if_room(stream)

    # -- the kernel's side -------------------------------------------------------------

    def kernel_readable(self, stream: RelayStream) -> None:
        data = receive(stream.kernel)
        if data is None:
            return
        if not data:
            stream.kernel_eof = True
            self.watch(stream.kernel, stream, False, False)
            self.flush(stream)
            if stream.link is None and not stream.unacked:
                self.end_stream(stream)
            return
        if stream.skip is not None:
            data = stream.skip.feed(data)
            if stream.kernel_greeted():
                self.kernel_writable(stream)
            if stream.skip.done:
                stream.skip = None
            if not data:
                return
        self.take_from_kernel(stream, data)
        if not self.room(stream):
            # The kernel's socket keeps what no one reads, to its high-water mark.
            if self.in_outage(stream) and stream.sid not in self.at_limit:
                self.at_limit.add(stream.sid)
                log(
                    "relay: %s stream %s paused: the launcher holds %d bytes for clients "
                    "that are away (outage_buffer %d and a quarter more for messages never "
                    "dropped); the kernel's socket keeps the rest, as for a slow client"
                    % (stream.channel, stream.sid, self.held(), self.bound)
                )
            stream.reading_paused = True
            stream.progress_at = time.monotonic()
            self.watch(stream.kernel, stream, False, bool(stream.to_kernel))
        self.flush(stream)

    def stream_count(self, channel: str) -> int:
        return sum(1 for stream in self.streams.values() if stream.channel == channel)

    def kernel_writable(self, stream: RelayStream) -> None:
        if self.streams.get(stream.sid) is not stream:
            return
        if stream.to_kernel and not send_from(stream.kernel, stream.to_kernel):
            self.end_stream(stream)
            return
        reading = not stream.kernel_eof and not stream.reading_paused
        self.watch(stream.kernel, stream, reading, bool(stream.to_kernel))
        link = stream.link
        if link is not None and link.phase == "open" and stream.waiting_for_kernel < TO_KERNEL_HIGH:
            self.watch(link.sock, link, True, bool(link.outbuf))

    def end_stream(self, stream: RelayStream) -> None:
        if self.streams.get(stream.sid) is not stream:
            return
        del self.streams[stream.sid]
        self.at_limit.discard(stream.sid)
        self.watch(stream.kernel, stream, False, False)
        stream.kernel.close()
        if stream.link is not None:
            link, stream.link = stream.link, None
            link.closing = True
            self.link_writable(link)
