"""The resumable-stream protocol, sans I/O: defined once, driven by both ends.

Each connection a client makes to one of the kernel's local ports becomes a *stream*:
the launcher's relay holds the stream's connection to the kernel on the host, and the
provisioner's ``tunnels`` hold the client's.  Between them an SSH channel carries
frames; when the SSH connection is lost, both ends keep what the other has not
confirmed, and a new channel resumes the stream where it stopped.  So nothing the
kernel sends while the link is down is lost (within ``outage_buffer`` bytes), and the
kernel's ZMQ sockets never see their peer leave.

A channel starts with JSON lines, a challenge-response on the attach token (neither end
sends the token, both prove they know it; the server proves it first):
  client  {"hello": NONCE, "stream": ID, "channel": NAME, "resume": BOOL, "received": N,
           "zmtp_answered": BOOL (a new stream whose client the provisioner greeted)}
  relay   {"nonce": NONCE2, "proof": prove(token, "relay", NONCE, NONCE2)}  or {"error": WHY}
  client  {"proof": prove(token, "client", NONCE2, NONCE)}
  relay   (resume only) {"received": M, "dropped_messages": ...} or {"error": WHY}
then frames: FRAME_HEADER (kind, bytes received so far from the other end, size) and
the payload.  Every frame acknowledges what its sender has received; a receiver that
sends nothing back acknowledges on its own every ACK_EVERY bytes.  The launcher's
control socket runs the same challenge-response with the role "launcher".

Both ends run on this module: the host's relay (select loop, Python >= 3.6) and the
provisioner's tunnels (asyncio), and the unit tests drive it byte by byte.
"""

import json
import os
import struct
from typing import Any, Dict, Iterator, Optional, Tuple

CHANNELS = ("shell", "iopub", "stdin", "control", "hb")
LAUNCHER_CHANNEL = "launcher"  # not a kernel channel: the launcher's control socket
FRAME_HEADER = struct.Struct(">cQI")
FRAME_DATA, FRAME_ACK, FRAME_CLOSE = b"D", b"A", b"C"
FRAME_KINDS = (FRAME_DATA, FRAME_ACK, FRAME_CLOSE)
FRAME_PAYLOAD_MAX = 65536
ACK_EVERY = 128 * 1024
# A new stream's only frame when the kernel does not listen on its channel's endpoint
# any more (it is ending: a shutdown, a restart): the client's connection is held for
# the kernel's next start, not closed (its ZMQ socket would reconnect at once, again
# and again, to a relay that can only refuse it).
NOT_LISTENING = b"the kernel is not listening"
LINE_MAX = 4096  # a handshake line


class ProtocolError(Exception):
    """The other end broke the protocol: the channel is dropped, never trusted."""


def prove(token: str, role: str, *nonces: str) -> str:
    """HMAC-SHA256 of the role and both nonces under the token: proof of knowing it."""
    import hashlib  # here: not on a launcher's way to its kernel's start (4 ms)
    import hmac

    message = ":".join((role, *nonces)).encode()
    return hmac.new(token.encode(), message, hashlib.sha256).hexdigest()


def new_nonce() -> str:
    return os.urandom(16).hex()


def encode_line(message: Dict[str, Any]) -> bytes:
    return (json.dumps(message) + "\n").encode()


def take_line(buffer: bytearray) -> Optional[Dict[str, Any]]:
    """The next JSON line of ``buffer`` (removed from it), or None until one is whole."""
    end = buffer.find(b"\n")
    if end < 0:
        if len(buffer) > LINE_MAX:
            raise ProtocolError("an overlong handshake line")
        return None
    line = bytes(buffer[:end])
    del buffer[: end + 1]
    try:
        message = json.loads(line.decode())
    except ValueError:
        raise ProtocolError("a handshake line that is not JSON") from None
    if not isinstance(message, dict):
        raise ProtocolError("a handshake line that is not a JSON object")
    return message


# -- the challenge-response: the server (relay or launcher) proves itself first --------


def hello(
    nonce: str,
    stream: str,
    channel: str,
    resume: bool = False,
    received: int = 0,
    zmtp_answered: bool = False,
) -> Dict[str, Any]:
    """A client's first line on a channel to the relay.  ``zmtp_answered``: the client
    got the kernel's ZMTP handshake from the provisioner (zmtp.kernel_handshake), so the
    relay takes the kernel's own off the new stream."""
    message = {
        "hello": nonce,
        "stream": stream,
        "channel": channel,
        "resume": resume,
        "received": received,
    }
    if zmtp_answered:
        message["zmtp_answered"] = True
    return message


def challenge(token: str, role: str, hello: Dict[str, Any]) -> Tuple[str, Dict[str, Any]]:
    """The server's answer to a client's hello: its nonce, and the message to send."""
    nonce = new_nonce()
    return nonce, {"nonce": nonce, "proof": prove(token, role, str(hello.get("hello")), nonce)}


def answer(token: str, role: str, mine: str, message: Dict[str, Any]) -> Dict[str, Any]:
    """The client's proof, once the server's message proved that it knows the token
    (``mine`` is the client's nonce); ProtocolError if it did not."""
    theirs = str(message.get("nonce", message.get("challenge")))  # older launchers
    import hmac

    expected = prove(token, role, mine, theirs)
    if not hmac.compare_digest(str(message.get("proof")), expected):
        raise ProtocolError("it could not prove it knows the kernel's token")
    return {"proof": prove(token, "client", theirs, mine)}


def proven(token: str, hello: Dict[str, Any], nonce: str, message: Dict[str, Any]) -> bool:
    """Did the client's answer prove that it knows the token?"""
    import hmac

    expected = prove(token, "client", nonce, str(hello.get("hello")))
    return hmac.compare_digest(str(message.get("proof")), expected)


# -- frames ----------------------------------------------------------------------------


def take_frames(buffer: bytearray) -> Iterator[Tuple[bytes, int, bytes]]:
    """(kind, acknowledged, payload) of each whole frame of ``buffer``, removed from it
    as it is taken (stop early and the rest stays)."""
    header = FRAME_HEADER.size
    while len(buffer) >= header:
        kind, acknowledged, size = FRAME_HEADER.unpack_from(buffer)
        if kind not in FRAME_KINDS or size > FRAME_PAYLOAD_MAX:
            raise ProtocolError("a malformed frame")
        if len(buffer) < header + size:
            return
        payload = bytes(buffer[header : header + size])
        del buffer[: header + size]
        yield kind, acknowledged, payload


def not_listening_frame() -> bytes:
    """The relay's answer to a new stream it cannot connect to the kernel."""
    return FRAME_HEADER.pack(FRAME_CLOSE, 0, len(NOT_LISTENING)) + NOT_LISTENING


class StreamEnd:
    """One end's account of a stream: what it sent that the other end has not confirmed
    (kept to be sent again on a new channel), and what it has received."""

    def __init__(self) -> None:
        self.unacked = bytearray()  # sent, not confirmed yet
        self.acked = 0  # bytes the other end confirmed, in all
        self.framed = 0  # bytes of ``unacked`` framed on the current channel
        self.received = 0  # bytes taken in from the other end, in all
        self.told = 0  # ``received`` as the other end last heard it

    @property
    def unframed(self) -> int:
        return len(self.unacked) - self.framed

    @property
    def ack_due(self) -> bool:
        """Has this end taken in enough unacknowledged that it must say so unasked?"""
        return self.received - self.told >= ACK_EVERY

    def rewind(self) -> None:
        """A new channel: everything not confirmed goes out again."""
        self.framed = 0

    def confirm(self, received: int) -> int:
        """The other end says it has taken in ``received`` bytes in all: forget them.
        How many bytes that newly confirmed (0 for an old or impossible count)."""
        confirmed = received - self.acked
        if not 0 < confirmed <= len(self.unacked):
            return 0
        del self.unacked[:confirmed]
        self.acked = received
        self.framed = max(0, self.framed - confirmed)
        return confirmed

    def took(self, payload: bytes) -> None:
        self.received += len(payload)

    def frame(self, kind: bytes, payload: bytes = b"") -> bytes:
        """A frame of ``kind``, acknowledging all this end received."""
        self.told = self.received
        return FRAME_HEADER.pack(kind, self.received, len(payload)) + payload

    @property
    def sent(self) -> int:
        """Bytes framed so far, in all (confirmed or on their way)."""
        return self.acked + self.framed

    def next_data(self, upto: Optional[int] = None) -> bytes:
        """The next DATA frame of what is not framed yet on this channel (only as far
        as offset ``upto`` of the whole stream, if given)."""
        stop = self.framed + FRAME_PAYLOAD_MAX
        if upto is not None:
            stop = min(stop, upto - self.acked)
        chunk = bytes(self.unacked[self.framed : stop])
        self.framed += len(chunk)
        return self.frame(FRAME_DATA, chunk)

    def next_data_into(self, out: bytearray) -> None:
        """``next_data`` appended to ``out`` with no copy in between (the relay's bulk
        path: a kernel's output, 64 KiB a frame)."""
        start = self.framed
        end = min(len(self.unacked), start + FRAME_PAYLOAD_MAX)
        self.told = self.received
        out += FRAME_HEADER.pack(FRAME_DATA, self.received, end - start)
        with memoryview(self.unacked) as view:  # released: unacked may grow again
            out += view[start:end]
        self.framed = end
