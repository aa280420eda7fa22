"""The OpenSSH mux protocol (PROTOCOL.mux) on the wire: its messages, and one
connection to a master's control socket, refused unless the master is ours."""

from __future__ import annotations

import asyncio
import os
import socket
import struct

import asyncssh

PROTOCOL_VERSION = 4
MUX_MSG_HELLO = 0x00000001
MUX_C_NEW_SESSION = 0x10000002
MUX_C_ALIVE_CHECK = 0x10000004
MUX_C_NEW_STDIO_FWD = 0x10000008
MUX_S_OK = 0x80000001
MUX_S_PERMISSION_DENIED = 0x80000002
MUX_S_FAILURE = 0x80000003
MUX_S_EXIT_MESSAGE = 0x80000004
MUX_S_ALIVE = 0x80000005
MUX_S_SESSION_OPENED = 0x80000006
NO_ESCAPE_CHAR = 0xFFFFFFFF
PACKET_MAX = 256 * 1024
ALIVE_CHECK_TIMEOUT = 2.0


class MasterNotOurs(ConnectionError):
    """The control socket is served by another user's process."""


def u32(value: int) -> bytes:
    return struct.pack(">I", value)


def string(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return u32(len(data)) + data


class Message:
    def __init__(self, payload: bytes) -> None:
        self._data = payload
        self._at = 0

    def u32(self) -> int:
        if self._at + 4 > len(self._data):
            raise ConnectionError("a truncated message from the OpenSSH master")
        (value,) = struct.unpack_from(">I", self._data, self._at)
        self._at += 4
        return int(value)

    def string(self) -> str:
        size = self.u32()
        data = self._data[self._at : self._at + size]
        self._at += size
        return data.decode("utf-8", "replace")


def peer_uid(sock: socket.socket, path: str) -> int:
    """Who serves the Unix socket: the peer process's uid where the system tells (Linux),
    else the socket file's owner."""
    peercred = getattr(socket, "SO_PEERCRED", None)
    if peercred is not None:
        _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, peercred, 12))
        return int(uid)
    return os.stat(path).st_uid


class MuxControl:
    """One connection to the master's control socket, past the hello."""

    def __init__(self, sock: socket.socket, path: str) -> None:
        self.sock = sock
        self.path = path
        self._buffer = bytearray()
        self._request_id = 0

    @classmethod
    async def open(cls, path: str) -> MuxControl:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, path)
            uid = peer_uid(sock, path)
            if uid != os.getuid():
                raise MasterNotOurs(
                    f"the control socket {path} is served by uid {uid}, not by you "
                    f"(uid {os.getuid()}): not using it"
                )
            control = cls(sock, path)
            await control.send(u32(MUX_MSG_HELLO) + u32(PROTOCOL_VERSION))
            hello = await control.receive()
            if hello is None or hello.u32() != MUX_MSG_HELLO:
                raise ConnectionError(f"{path} is not an OpenSSH master's control socket")
            version = hello.u32()
            if version != PROTOCOL_VERSION:
                raise ConnectionError(
                    f"the OpenSSH master at {path} speaks mux protocol {version}, "
                    f"not {PROTOCOL_VERSION}"
                )
        except BaseException:
            sock.close()
            raise
        return control

    def next_request(self) -> int:
        self._request_id += 1
        return self._request_id

    async def send(self, payload: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, u32(len(payload)) + payload)

    async def send_fd(self, fd: int) -> None:
        """Pass ``fd`` to the master, with the one byte the master reads alongside it."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                socket.send_fds(self.sock, [b"\0"], [fd])
                return
            except (BlockingIOError, InterruptedError):
                writable: asyncio.Future[None] = loop.create_future()

                def ready(waiter: asyncio.Future[None] = writable) -> None:
                    if not waiter.done():
                        waiter.set_result(None)

                loop.add_writer(self.sock, ready)
                try:
                    await writable
                finally:
                    loop.remove_writer(self.sock)

    async def receive(self) -> Message | None:
        """The next message, or None once the master closed the connection."""
        loop = asyncio.get_running_loop()
        while True:
            if len(self._buffer) >= 4:
                (size,) = struct.unpack_from(">I", self._buffer)
                if size > PACKET_MAX:
                    raise ConnectionError(f"an oversized message from the master at {self.path}")
                if len(self._buffer) >= 4 + size:
                    payload = bytes(self._buffer[4 : 4 + size])
                    del self._buffer[: 4 + size]
                    return Message(payload)
            try:
                data = await loop.sock_recv(self.sock, 65536)
            except ConnectionResetError:
                data = b""
            if not data:
                return None
            self._buffer += data

    async def reply_to(self, request_id: int) -> tuple[int, Message]:
        """The kind of the master's answer to ``request_id``, and the rest of it; a
        refusal raises ChannelOpenError, a master gone raises ConnectionError."""
        message = await self.receive()
        if message is None:
            raise ConnectionError(f"the OpenSSH master at {self.path} closed the connection")
        kind, answered = message.u32(), message.u32()
        if answered != request_id:
            raise ConnectionError(f"the OpenSSH master at {self.path} answered out of order")
        if kind in (MUX_S_FAILURE, MUX_S_PERMISSION_DENIED):
            code = (
                asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED
                if kind == MUX_S_PERMISSION_DENIED
                else asyncssh.OPEN_CONNECT_FAILED
            )
            reason = f"{message.string()} (OpenSSH master {self.path})"
            raise asyncssh.ChannelOpenError(code, reason)
        return kind, message

    async def alive_check(self) -> int:
        request = self.next_request()
        await self.send(u32(MUX_C_ALIVE_CHECK) + u32(request))
        kind, message = await self.reply_to(request)
        if kind != MUX_S_ALIVE:
            raise ConnectionError(f"the OpenSSH master at {self.path} did not answer")
        return message.u32()

    def close(self) -> None:
        self.sock.close()


async def master_answers(path: str) -> bool:
    """Does an OpenSSH master of ours answer at ``path`` now?  (Nothing is kept open.)"""
    try:
        control = await asyncio.wait_for(MuxControl.open(path), ALIVE_CHECK_TIMEOUT)
    except (OSError, TimeoutError):
        return False
    control.close()
    return True
