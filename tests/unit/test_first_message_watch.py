"""The IOPub gate's ZMTP reading: the kernel's first message to a client, past the
handshake, in whatever pieces the bytes arrive."""

from __future__ import annotations

from ssh_provisioner.streams import FirstMessageWatch

GREETING = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x01" + b"NULL".ljust(20, b"\x00") + b"\x00" * 32


def command(name: bytes, body: bytes = b"") -> bytes:
    payload = bytes([len(name)]) + name + body
    return bytes([0x04, len(payload)]) + payload


def test_the_handshake_alone_is_not_a_message() -> None:
    watch = FirstMessageWatch()
    assert len(GREETING) == 64
    assert not watch.feed(GREETING + command(b"READY", b"\x0bSocket-Type\x00\x00\x00\x03PUB"))


def test_a_message_frame_after_the_handshake_fed_byte_by_byte() -> None:
    stream = GREETING + command(b"READY") + bytes([0x01, 3]) + b"abc" + bytes([0x00, 1]) + b"x"
    watch = FirstMessageWatch()
    seen = [watch.feed(stream[i : i + 1]) for i in range(len(stream))]
    assert seen.index(True) == len(GREETING) + len(command(b"READY")) + 2 + 3 - 1


def test_a_long_frame_and_curves_message_command() -> None:
    long_frame = bytes([0x02]) + (70000).to_bytes(8, "big")
    assert FirstMessageWatch().feed(GREETING + command(b"READY") + long_frame)  # too big to wait
    curve = GREETING + command(b"WELCOME", b"k" * 100) + command(b"READY")
    watch = FirstMessageWatch()
    assert not watch.feed(curve)
    assert watch.feed(command(b"MESSAGE", b"n" * 30))
