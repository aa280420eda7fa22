"""The launcher's relay, on real sockets in this process: the handshake proves both
ends, a stream resumes on a new connection without a byte lost or repeated, and the
ZMTP cutting that lets it drop whole output messages (with a signed notice)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from jupyter_client.session import Session

from ssh_provisioner.host.relay import Relay
from ssh_provisioner.host.spec import LaunchSpec
from ssh_provisioner.host.wire import (
    FRAME_CLOSE,
    FRAME_DATA,
    FRAME_HEADER,
    NOT_LISTENING,
    answer,
    encode_line,
    hello,
    new_nonce,
    prove,
    take_frames,
    take_line,
)
from ssh_provisioner.host.zmtp import (
    MessageCutter,
    kernel_handshake,
    message_type,
    stream_notice,
    zmtp_frames,
)

TOKEN = "0123456789abcdef0123456789abcdef"  # noqa: S105  (a test token)
KEY = "a-session-key"
GREETING = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x01" + b"NULL".ljust(20, b"\x00") + b"\x00" * 32


def command(name: bytes, body: bytes = b"") -> bytes:
    payload = bytes([len(name)]) + name + body
    return bytes([0x04, len(payload)]) + payload


def jupyter_message(msg_type: str, text: str = "") -> list[bytes]:
    header = json.dumps({"msg_type": msg_type, "msg_id": "m"}).encode()
    parent = json.dumps({"msg_id": "the-cell"}).encode()
    return [b"topic", b"<IDS|MSG>", b"sig", header, parent, b"{}", text.encode()]


# -- ZMTP cutting ------------------------------------------------------------------------


def test_the_cutter_finds_each_message_in_any_pieces() -> None:
    first, second = jupyter_message("stream", "x" * 300), jupyter_message("status")
    stream = GREETING + command(b"READY") + zmtp_frames(first) + zmtp_frames(second)
    cutter = MessageCutter()
    segments = [s for i in range(len(stream)) for s in cutter.feed(stream[i : i + 1])]
    assert b"".join(s[0] for s in segments) == stream
    offsets, position = [], 0
    for data, starts, _, ends in segments:
        if starts:
            offsets.append(("start", position))
        position += len(data)
        if ends:
            offsets.append(("end", position))
    handshake = len(GREETING) + len(command(b"READY"))
    middle = handshake + len(zmtp_frames(first))
    assert offsets == [
        ("start", handshake),
        ("end", middle),
        ("start", middle),
        ("end", len(stream)),
    ]
    assert message_type(cutter.frames) == "status"
    assert cutter.between_messages


def test_curve_makes_the_stream_opaque() -> None:
    cutter = MessageCutter()
    cutter.feed(GREETING + command(b"READY"))
    cutter.feed(command(b"MESSAGE", b"\x00" * 40) + b"anything at all")
    assert cutter.opaque
    assert not cutter.between_messages


def test_the_notice_is_a_message_jupyter_client_verifies() -> None:
    parent = json.dumps({"msg_id": "the-cell", "msg_type": "execute_request"}).encode()
    notice = stream_notice({"key": KEY, "signature_scheme": "hmac-sha256"}, parent, "dropped")
    cutter = MessageCutter()
    cutter.feed(GREETING + command(b"READY") + notice)
    frames = cutter.frames
    session = Session(key=KEY.encode())
    _, parts = session.feed_identities(frames)
    message = session.deserialize(parts)  # raises on a bad signature
    assert message["msg_type"] == "stream"
    assert message["parent_header"]["msg_id"] == "the-cell"
    assert message["content"] == {"name": "stderr", "text": "dropped"}


# -- the relay on real sockets -----------------------------------------------------------


class FakeKernel:
    """A Unix listener that records what each connection sends and can send back."""

    def __init__(self, path: str) -> None:
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(4)
        self.server.settimeout(5)

    def accept(self) -> socket.socket:
        conn, _ = self.server.accept()
        OPEN_SOCKETS.append(conn)
        conn.settimeout(5)
        return conn


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[tuple[Relay, FakeKernel]]:
    kernel = FakeKernel(str(tmp_path / "shell"))
    endpoints = {"shell": str(tmp_path / "shell")}
    spec = LaunchSpec(
        {
            "argv": ["a-kernel"],
            "kernel_id": "k",
            "attach_token": TOKEN,
            "connection": {"key": KEY},
            "stream_linger": 30,
        }
    )
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    relay = Relay(spec, "ipc", endpoints, str(runtime))
    yield relay, kernel
    relay.close()
    relay.thread.join(5)
    assert not relay.thread.is_alive()
    kernel.server.close()


OPEN_SOCKETS: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _close_sockets() -> Iterator[None]:
    yield
    while OPEN_SOCKETS:
        OPEN_SOCKETS.pop().close()


class Client:
    """The provisioner's side of one channel, on the wire module the provisioner uses;
    frames are written by hand, to send the relay any acknowledgement."""

    def __init__(self, relay: Relay) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        OPEN_SOCKETS.append(self.sock)
        self.sock.settimeout(5)
        self.sock.connect(relay.address)
        self.buffer = bytearray()

    def more(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("closed")
        self.buffer += data

    def line(self) -> dict[str, Any]:
        while (message := take_line(self.buffer)) is None:
            self.more()
        return message

    def send_line(self, message: dict[str, Any]) -> None:
        self.sock.sendall(encode_line(message))

    def open(self, sid: str, resume: bool = False, received: int = 0, token: str = TOKEN) -> None:
        nonce = new_nonce()
        self.send_line(hello(nonce, sid, "shell", resume, received))
        reply = self.line()
        proof = answer(TOKEN, "relay", nonce, reply)  # raises unless the relay knows the token
        if token != TOKEN:
            proof = {"proof": prove(token, "client", reply["nonce"], nonce)}
        self.send_line(proof)

    def frame(self, kind: bytes, received: int, payload: bytes = b"") -> None:
        self.sock.sendall(FRAME_HEADER.pack(kind, received, len(payload)) + payload)

    def read_frame(self) -> tuple[bytes, int, bytes]:
        while (frame := next(take_frames(self.buffer), None)) is None:
            self.more()
        return frame

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except OSError:
            return True


def recv_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        assert chunk, "closed early"
        data += chunk
    return data


def test_a_client_without_the_token_reaches_no_kernel(relay: tuple[Relay, FakeKernel]) -> None:
    server, kernel = relay
    client = Client(server)
    client.open("s1", token="not-the-token")  # noqa: S106
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # refused already
        client.frame(FRAME_DATA, 0, b"password = 'x'")
    assert client.closed()
    kernel.server.settimeout(0.5)
    with pytest.raises(socket.timeout):
        kernel.accept()  # no connection was made to the kernel for it


def test_a_stream_resumes_on_a_new_connection_without_loss_or_repeats(
    relay: tuple[Relay, FakeKernel],
) -> None:
    server, kernel = relay
    client = Client(server)
    client.open("s1")
    client.frame(FRAME_DATA, 0, b"request-1")
    conn = kernel.accept()
    assert recv_exactly(conn, 9) == b"request-1"
    conn.sendall(b"reply-1")
    kind, ack, payload = client.read_frame()
    assert (kind, ack, payload) == (FRAME_DATA, 9, b"reply-1")
    client.sock.close()  # the SSH connection is lost

    conn.sendall(b"output-while-down")  # the kernel keeps sending: the relay keeps it
    resumed = Client(server)
    resumed.open("s1", resume=True, received=7)
    assert resumed.line() == {"received": 9, "dropped_messages": 0, "dropped_bytes": 0}
    kind, ack, payload = resumed.read_frame()
    assert (kind, payload) == (FRAME_DATA, b"output-while-down")  # not reply-1 again
    resumed.frame(FRAME_DATA, 24, b"request-2")
    assert recv_exactly(conn, 9) == b"request-2"
    resumed.frame(FRAME_CLOSE, 24)
    conn.settimeout(5)
    assert conn.recv(1) == b""  # the client left: the relay closed the kernel's side
    assert resumed.closed()


def test_a_resume_of_an_unknown_stream_is_refused(relay: tuple[Relay, FakeKernel]) -> None:
    server, _ = relay
    client = Client(server)
    client.open("never-opened", resume=True)
    assert "error" in client.line()
    assert client.closed()


def test_the_kernel_closing_ends_the_stream(relay: tuple[Relay, FakeKernel]) -> None:
    server, kernel = relay
    client = Client(server)
    client.open("s1")
    client.frame(FRAME_DATA, 0, b"x")
    conn = kernel.accept()
    assert recv_exactly(conn, 1) == b"x"  # (unread data would make the close a reset)
    conn.sendall(b"last words")
    conn.close()
    assert client.read_frame() == (FRAME_DATA, 1, b"last words")
    assert client.read_frame()[0] == FRAME_CLOSE
    client.frame(FRAME_CLOSE, 10)  # got it all: the client's CLOSE ends the stream
    done = threading.Event()
    threading.Thread(target=lambda: (client.closed(), done.set()), daemon=True).start()
    assert done.wait(5)


def test_a_stream_the_kernel_closed_resends_its_tail_after_a_lost_channel(
    relay: tuple[Relay, FakeKernel],
) -> None:
    """The channel is lost with the stream's last bytes and its CLOSE in it (a page a
    dashboard served, cut off by a blip): a resume gets them again."""
    server, kernel = relay
    client = Client(server)
    client.open("s1")
    client.frame(FRAME_DATA, 0, b"x")
    conn = kernel.accept()
    assert recv_exactly(conn, 1) == b"x"
    conn.sendall(b"the whole page")
    conn.close()
    assert client.read_frame() == (FRAME_DATA, 1, b"the whole page")
    assert client.read_frame()[0] == FRAME_CLOSE
    client.sock.close()  # lost before it could confirm any of it
    again = Client(server)
    again.open("s1", resume=True, received=0)
    assert again.line()["received"] == 1
    assert again.read_frame() == (FRAME_DATA, 1, b"the whole page")
    assert again.read_frame()[0] == FRAME_CLOSE
    again.frame(FRAME_CLOSE, 14)
    done = threading.Event()
    threading.Thread(target=lambda: (again.closed(), done.set()), daemon=True).start()
    assert done.wait(5)


def test_a_kernel_that_stopped_listening_gets_its_new_stream_refused_not_reset(
    relay: tuple[Relay, FakeKernel],
) -> None:
    """A kernel ending (a restart): the client is told, so it holds the connection for
    the next kernel instead of closing it (and being reconnected at once, again)."""
    server, kernel = relay
    kernel.server.close()  # the kernel closed its sockets
    Path(server.endpoints["shell"]).unlink()
    client = Client(server)
    client.open("s1")
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # refused already
        client.frame(FRAME_DATA, 0, b"a request for the next kernel")
    kind, _, payload = client.read_frame()
    assert (kind, payload) == (FRAME_CLOSE, NOT_LISTENING)
    assert client.closed()
    assert not server.streams  # nothing kept for it


def test_a_client_answered_here_reaches_a_real_zmq_kernel_socket(tmp_path: Path) -> None:
    """The provisioner says the kernel's ZMTP handshake to the client itself; through
    the relay, the client's greeting reaches the kernel alone (libzmq drops what comes
    with its end), the kernel's own handshake never reaches the client, and a request
    and its reply cross as they would directly."""
    context = zmq.Context()
    kernel = context.socket(zmq.ROUTER)
    client = context.socket(zmq.DEALER)
    endpoint = str(tmp_path / "shell")
    kernel.bind(f"ipc://{endpoint}")
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    spec = LaunchSpec(
        {"argv": ["k"], "kernel_id": "k", "attach_token": TOKEN, "connection": {"key": KEY}}
    )
    relay = Relay(spec, "ipc", {"shell": endpoint}, str(runtime))
    local = socket.socket()
    try:
        assert relay.answers_zmtp
        local.bind(("127.0.0.1", 0))
        local.listen(1)
        client.connect(f"tcp://127.0.0.1:{local.getsockname()[1]}")
        accepted, _ = local.accept()
        OPEN_SOCKETS.append(accepted)
        accepted.settimeout(5)
        accepted.sendall(kernel_handshake("shell"))  # what the provisioner says at once
        client.send_multipart([b"", b"a request"])
        sent = bytearray()
        while len(sent) < 64 + 2 + 41 + 2 + 2 + len(b"a request"):  # greeting, READY, frames
            sent += accepted.recv(65536)
        through = Client(relay)
        nonce = new_nonce()
        through.send_line(hello(nonce, "s1", "shell", zmtp_answered=True))
        through.send_line(answer(TOKEN, "relay", nonce, through.line()))
        through.frame(FRAME_DATA, 0, bytes(sent))  # all in one piece, as a stream carries it
        assert kernel.poll(5000)
        identity, delimiter, request = kernel.recv_multipart()
        assert (delimiter, request) == (b"", b"a request")
        kernel.send_multipart([identity, b"", b"its reply"])
        kind, _, payload = through.read_frame()
        assert kind == FRAME_DATA
        assert payload[:1] != b"\xff"  # no greeting: the kernel's handshake was taken off
        accepted.sendall(payload)
        assert client.poll(5000)
        assert client.recv_multipart() == [b"", b"its reply"]
    finally:
        client.close(0)
        kernel.close(0)
        context.term()
        local.close()
        relay.close()
        relay.thread.join(5)
