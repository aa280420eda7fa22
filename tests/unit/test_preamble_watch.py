"""IOPub-first's ZMTP reading: where the first message starts, past the handshake, in
whatever pieces the bytes arrive (the kernel's first message to an IOPub client; a
client's first request, which waits while its handshake goes on)."""

from __future__ import annotations

from ssh_provisioner.streams import PreambleWatch

GREETING = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x01" + b"NULL".ljust(20, b"\x00") + b"\x00" * 32


def command(name: bytes, body: bytes = b"") -> bytes:
    payload = bytes([len(name)]) + name + body
    return bytes([0x04, len(payload)]) + payload


def test_the_handshake_alone_is_all_preamble() -> None:
    watch = PreambleWatch()
    assert len(GREETING) == 64
    handshake = GREETING + command(b"READY", b"\x0bSocket-Type\x00\x00\x00\x03PUB")
    watch.feed(handshake)
    assert watch.first_message is None
    assert watch.allowed(len(handshake)) == len(handshake)


def test_a_message_frame_after_the_handshake_fed_byte_by_byte() -> None:
    handshake = GREETING + command(b"READY")
    stream = handshake + bytes([0x01, 3]) + b"abc" + bytes([0x00, 1]) + b"x"
    watch = PreambleWatch()
    for i in range(len(stream)):
        watch.feed(stream[i : i + 1])
        assert watch.allowed(i + 1) == min(i + 1, len(handshake))
    assert watch.first_message == len(handshake)


def test_a_long_frame_and_curves_message_command() -> None:
    long_frame = bytes([0x02]) + (70000).to_bytes(8, "big")
    watch = PreambleWatch()
    watch.feed(GREETING + command(b"READY") + long_frame)
    assert watch.first_message == len(GREETING) + len(command(b"READY"))
    curve = GREETING + command(b"HELLO", b"k" * 100) + command(b"INITIATE", b"v" * 200)
    watch = PreambleWatch()
    watch.feed(curve)
    assert watch.first_message is None
    watch.feed(command(b"MESSAGE", b"n" * 30))
    assert watch.first_message == len(curve)
