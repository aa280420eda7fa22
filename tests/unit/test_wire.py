"""The stream protocol on its own (``ssh_provisioner.host.wire``), as both ends use it:
two StreamEnds talking through byte buffers, cut at every offset, with hostile input."""

from __future__ import annotations

import pytest

from ssh_provisioner.host.wire import (
    ACK_EVERY,
    FRAME_ACK,
    FRAME_CLOSE,
    FRAME_DATA,
    FRAME_HEADER,
    FRAME_PAYLOAD_MAX,
    LINE_MAX,
    ProtocolError,
    StreamEnd,
    answer,
    challenge,
    encode_line,
    hello,
    proven,
    take_frames,
    take_line,
)

TOKEN = "0123456789abcdef0123456789abcdef"  # noqa: S105  (a test token)


def deliver(wire_bytes: bytes, receiver: StreamEnd, sender: StreamEnd, pieces: int) -> bytes:
    """Feed ``wire_bytes`` to ``receiver`` in ``pieces``-byte reads; what it passed on."""
    buffer, out = bytearray(), bytearray()
    for start in range(0, len(wire_bytes), pieces):
        buffer += wire_bytes[start : start + pieces]
        for kind, acknowledged, payload in take_frames(buffer):
            sender.confirm(acknowledged)  # (the sender's own view, as the receiver says)
            if kind == FRAME_DATA:
                receiver.took(payload)
                out += payload
    assert not buffer, "a whole frame left unread"
    return bytes(out)


@pytest.mark.parametrize("pieces", [1, 7, FRAME_HEADER.size, 65536])
def test_frames_arrive_whole_in_any_pieces(pieces: int) -> None:
    sender, receiver = StreamEnd(), StreamEnd()
    data = bytes(range(256)) * 700  # more than two frames' worth
    sender.unacked += data
    wire_bytes = b""
    while sender.unframed:
        wire_bytes += sender.next_data()
    sender.rewind()
    into = bytearray()
    while sender.unframed:
        sender.next_data_into(into)
    assert bytes(into) == wire_bytes  # the relay's way, byte for byte the same
    assert deliver(wire_bytes, receiver, StreamEnd(), pieces) == data
    assert receiver.received == len(data)
    assert max(len(p) for _, _, p in take_frames(bytearray(wire_bytes))) == FRAME_PAYLOAD_MAX


def test_a_resume_at_every_offset_loses_and_repeats_nothing() -> None:
    data = bytes(range(251)) * 3  # 753 bytes, so frames of 100 bytes fall out of step
    for cut in range(len(data) + 1):
        sender, receiver = StreamEnd(), StreamEnd()
        sender.unacked += data
        # The first channel carries ``cut`` bytes before it is lost; the receiver's
        # confirmation of them may or may not have come back.
        got = bytearray(data[:cut])
        receiver.took(data[:cut])
        if cut % 2:
            sender.confirm(receiver.received)
        # The new channel: the receiver says how far it got (the hello's "received"),
        # the sender confirms that and sends the rest again from there.
        sender.confirm(receiver.received)
        sender.rewind()
        while sender.unframed:
            for kind, _, payload in take_frames(bytearray(sender.next_data())):
                assert kind == FRAME_DATA
                receiver.took(payload)
                got += payload
        assert bytes(got) == data, f"resumed at {cut}"


def test_an_ack_is_due_every_ack_every_bytes_and_frames_carry_it() -> None:
    end = StreamEnd()
    end.took(b"x" * (ACK_EVERY - 1))
    assert not end.ack_due
    end.took(b"x")
    assert end.ack_due
    kind, acknowledged, payload = next(take_frames(bytearray(end.frame(FRAME_ACK))))
    assert (kind, acknowledged, payload) == (FRAME_ACK, ACK_EVERY, b"")
    assert not end.ack_due


def test_confirmations_that_are_old_or_impossible_change_nothing() -> None:
    end = StreamEnd()
    end.unacked += b"0123456789"
    assert end.confirm(4) == 4
    assert end.confirm(3) == 0  # old (a frame from before a resume)
    assert end.confirm(11) == 0  # more than was ever sent: hostile
    assert end.confirm(2**63) == 0
    assert bytes(end.unacked) == b"456789"
    assert end.confirm(10) == 6
    assert not end.unacked


@pytest.mark.parametrize(
    "frame",
    [
        FRAME_HEADER.pack(b"X", 0, 0),  # no such kind
        FRAME_HEADER.pack(FRAME_DATA, 0, FRAME_PAYLOAD_MAX + 1),  # a size no end sends
        FRAME_HEADER.pack(FRAME_DATA, 0, 2**32 - 1),  # would make the reader wait for 4 GiB
    ],
)
def test_hostile_frames_are_protocol_errors(frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        list(take_frames(bytearray(frame)))


def test_a_close_frame_stops_the_reader_with_the_rest_left() -> None:
    end = StreamEnd()
    buffer = bytearray(end.frame(FRAME_CLOSE) + end.frame(FRAME_DATA, b"after"))
    frames = take_frames(buffer)
    assert next(frames)[0] == FRAME_CLOSE
    assert len(buffer) == FRAME_HEADER.size + len(b"after")


def test_handshake_lines_whole_overlong_and_not_json() -> None:
    buffer = bytearray(encode_line({"a": 1})[:-3])
    assert take_line(buffer) is None  # not whole yet
    buffer += encode_line({"a": 1})[-3:] + encode_line({"b": 2})
    assert take_line(buffer) == {"a": 1}
    assert take_line(buffer) == {"b": 2}
    with pytest.raises(ProtocolError):
        take_line(bytearray(b"x" * (LINE_MAX + 1)))
    with pytest.raises(ProtocolError):
        take_line(bytearray(b"not json\n"))
    with pytest.raises(ProtocolError):
        take_line(bytearray(b"[1, 2]\n"))


def test_the_challenge_response_proves_both_ends_and_never_sends_the_token() -> None:
    mine = "client-nonce"
    first = hello(mine, "stream-1", "shell")
    nonce, server_says = challenge(TOKEN, "relay", first)
    reply = answer(TOKEN, "relay", mine, server_says)
    assert proven(TOKEN, first, nonce, reply)
    assert TOKEN not in repr((first, server_says, reply))
    # a server without the token cannot make the client prove itself
    _, impostor = challenge("another-token", "relay", first)
    with pytest.raises(ProtocolError):
        answer(TOKEN, "relay", mine, impostor)
    # a proof for another role (the launcher's control socket) is not the relay's
    with pytest.raises(ProtocolError):
        answer(TOKEN, "launcher", mine, server_says)
    # a client without the token is refused, and so is a replayed answer
    assert not proven(TOKEN, first, nonce, answer("another-token", "relay", mine, impostor))
    _, again = challenge(TOKEN, "relay", first)
    assert not proven(TOKEN, first, nonce + "x", reply)
    assert again["nonce"] != nonce
