"""Just enough ZMTP 3 to cut a kernel's IOPub stream into messages, to write one, and
to answer a client's handshake in the kernel's name.

The handshake (greetings both ways, then READY both ways) would cost two round trips to
the host before a client's first request could leave.  With the NULL mechanism what a
kernel's socket says is known in advance (``kernel_handshake``): the provisioner says
it to the client at once, the client's own greeting and READY travel to the kernel with
its first request, and the relay takes the kernel's answer off the stream
(``HandshakeSkip``).  CurveZMQ's handshake is the kernel's to answer: it goes through.
"""

import json
import time
from typing import Any, Dict, List, Optional

from .wire import ProtocolError

GREETING_SIZE = 64
# The socket type the Jupyter messaging spec gives each of a kernel's channels.
KERNEL_SOCKET_TYPES = {
    "shell": b"ROUTER",
    "control": b"ROUTER",
    "stdin": b"ROUTER",
    "iopub": b"PUB",
    "hb": b"REP",
}


def _command(name: bytes, body: bytes) -> bytes:
    payload = bytes([len(name)]) + name + body
    if len(payload) > 255:
        return b"\x06" + len(payload).to_bytes(8, "big") + payload
    return bytes([0x04, len(payload)]) + payload


def _property(name: bytes, value: bytes) -> bytes:
    return bytes([len(name)]) + name + len(value).to_bytes(4, "big") + value


def kernel_handshake(channel: str) -> bytes:
    """What the kernel's socket for ``channel`` says first, with the NULL mechanism: a
    ZMTP 3.0 greeting (3.0, so that a client sends subscriptions as messages, which
    every ZMTP 3 kernel reads) and READY with its socket type."""
    socket_type = KERNEL_SOCKET_TYPES[channel]
    greeting = b"\xff" + bytes(7) + b"\x01\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00")
    greeting += bytes(GREETING_SIZE - len(greeting))  # as-server 0, then the filler
    properties = _property(b"Socket-Type", socket_type)
    if socket_type == b"ROUTER":  # as libzmq's ROUTER says it
        properties += _property(b"Identity", b"")
    return greeting + _command(b"READY", properties)


class HandshakeSkip:
    """Takes the kernel's own greeting and READY off the start of what its socket sends
    a client that the provisioner answered already (``kernel_handshake``)."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.greeted = False  # the kernel's greeting is in: it has taken the client's
        self.done = False

    def feed(self, data: bytes) -> bytes:
        """What of ``data`` comes after the kernel's handshake (b"" while in it)."""
        if self.done:
            return data
        buffer = self.buffer
        buffer += data
        if len(buffer) < GREETING_SIZE:
            return b""
        self.greeted = True
        if bytes(buffer[12:32]).rstrip(b"\x00") != b"NULL":
            raise ProtocolError("the kernel's socket does not use the NULL mechanism")
        position = GREETING_SIZE
        while True:
            if len(buffer) < position + 1:
                return b""
            flags = buffer[position]
            head = 9 if flags & 0x02 else 2
            if len(buffer) < position + head:
                return b""
            size = int.from_bytes(bytes(buffer[position + 1 : position + head]), "big")
            if not flags & 0x04:
                raise ProtocolError("the kernel's socket sent a message before READY")
            if len(buffer) < position + head + size:
                return b""
            body = buffer[position + head : position + head + size]
            name = bytes(body[1 : 1 + body[0]]) if size else b""
            if name == b"ERROR":
                raise ProtocolError("the kernel's socket refused the handshake")
            position += head + size
            if name == b"READY":
                self.done = True
                rest = bytes(buffer[position:])
                buffer.clear()
                return rest


class MessageCutter:
    """Follows the ZMTP 3 byte stream a kernel's socket sends, to tell where each
    message starts and ends, so that whole messages can be dropped.  With CurveZMQ the
    boundaries are inside the encrypted boxes: the stream turns ``opaque``."""

    GREETING = 64
    KEEP_FRAME = 4096  # frames of a message kept for ``frames`` (the headers are small)

    def __init__(self, greeted: bool = False) -> None:
        self.header = bytearray()
        self.kind = "greeting"
        self.remaining = 0 if greeted else self.GREETING  # greeted: the handshake is off
        self.more = False
        self.in_message = False
        self.body = bytearray()
        self.keeping = True
        self.frames: List[bytes] = []
        self.opaque = False

    @property
    def between_messages(self) -> bool:
        return not self.in_message and not self.opaque

    def feed(self, data: bytes) -> List[Any]:
        """``data`` as segments: (bytes, starts a message, in a message, ends it)."""
        if self.opaque:
            return [(data, False, False, False)]
        segments: List[Any] = []
        pos, size = 0, len(data)
        while pos < size:
            if self.remaining:
                chunk = data[pos : pos + self.remaining]
                pos += len(chunk)
                self.remaining -= len(chunk)
                if self.keeping:
                    self.body += chunk
                ends = False
                if not self.remaining:
                    ends = self.unit_done()
                segments.append((chunk, False, self.kind == "frame", ends))
                if self.opaque:
                    segments.append((data[pos:], False, False, False))
                    return [s for s in segments if s[0]]
                continue
            self.header.append(data[pos])
            pos += 1
            flags = self.header[0]
            need = 9 if flags & 0x02 else 2
            if len(self.header) < need:
                continue
            length = int.from_bytes(bytes(self.header[1:need]), "big")
            header = bytes(self.header)
            self.header.clear()
            self.kind = "command" if flags & 0x04 else "frame"
            self.more = bool(flags & 0x01)
            self.remaining = length
            self.body.clear()
            self.keeping = length <= self.KEEP_FRAME
            starts = self.kind == "frame" and not self.in_message
            if starts:
                self.in_message = True
                self.frames = []
            ends = self.unit_done() if not length else False
            segments.append((header, starts, self.kind == "frame", ends))
        return segments

    def unit_done(self) -> bool:
        """A greeting, command or frame is complete: True if it ended a message."""
        if self.kind == "command":
            name = bytes(self.body[1 : 1 + self.body[0]]) if self.body else b""
            self.opaque = name == b"MESSAGE"
            return False
        if self.kind != "frame":
            return False
        self.frames.append(bytes(self.body))
        if self.more:
            return False
        self.in_message = False
        return True


def zmtp_frames(parts: List[bytes]) -> bytes:
    out = bytearray()
    for index, part in enumerate(parts):
        more = 0x01 if index < len(parts) - 1 else 0
        if len(part) > 255:
            out += bytes([more | 0x02]) + len(part).to_bytes(8, "big")
        else:
            out += bytes([more, len(part)])
        out += part
    return bytes(out)


DROPPABLE_MESSAGES = ("stream", "display_data", "update_display_data")


def message_type(frames: List[bytes]) -> Optional[str]:
    """The msg_type of a Jupyter message whose header frame is among ``frames``; "" if
    it cannot be read, None while the header has not come yet."""
    if b"<IDS|MSG>" not in frames:
        return None
    index = frames.index(b"<IDS|MSG>") + 2
    if len(frames) <= index:
        return None
    try:
        return str(json.loads(frames[index].decode("utf-8"))["msg_type"])
    except (ValueError, KeyError, TypeError):
        return ""


def parent_of(frames: List[bytes]) -> bytes:
    """The parent header of a Jupyter message in ZMQ frames, or b"{}"."""
    try:
        return frames[frames.index(b"<IDS|MSG>") + 3]
    except (ValueError, IndexError):
        return b"{}"


def execution_state(frames: List[bytes]) -> Optional[str]:
    """ "busy" or "idle" for a status message, else None."""
    try:  # most messages are no status: the header is parsed only if it may be one
        header = frames[frames.index(b"<IDS|MSG>") + 2]
    except (ValueError, IndexError):
        return None
    if b'"status"' not in header or message_type(frames) != "status":
        return None
    try:
        content = json.loads(frames[frames.index(b"<IDS|MSG>") + 5].decode("utf-8"))
        return str(content["execution_state"])
    except (ValueError, IndexError, KeyError, TypeError):
        return None


def stream_notice(connection: Dict[str, Any], parent: bytes, text: str) -> bytes:
    """A signed ``stream`` message (stderr) for IOPub, in ZMTP frames: what the user
    sees in the cell whose output was dropped."""
    import hashlib
    import hmac
    import uuid

    header = json.dumps(
        {
            "msg_id": uuid.uuid4().hex,
            "msg_type": "stream",
            "username": "ssh-provisioner",
            "session": uuid.uuid4().hex,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime()),
            "version": "5.3",
        }
    ).encode()
    content = json.dumps({"name": "stderr", "text": text}).encode()
    parts = [header, parent, b"{}", content]
    key = str(connection.get("key") or "").encode()
    scheme = str(connection.get("signature_scheme") or "hmac-sha256")
    signature = b""
    if key:
        digest = hmac.new(key, digestmod=getattr(hashlib, scheme.split("-", 1)[-1]))
        for part in parts:
            digest.update(part)
        signature = digest.hexdigest().encode()
    return zmtp_frames([b"stream.stderr", b"<IDS|MSG>", signature, *parts])
