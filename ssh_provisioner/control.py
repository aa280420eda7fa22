"""The launcher's channels: starting a launcher, and reaching a running one's control
socket (a reattach).

Over a link that holds sessions, a session running the launcher's reattach payload
relays the control socket; otherwise (an OpenSSH master, whose sessions count against
MaxSessions, or a Slurm node reached through its relay) a stream to the launcher's
relay does.  Both ends prove they know the kernel's token (``host/wire``), the launcher
first.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shlex
from typing import Any

import asyncssh

from .errors import SSHConnectError, session_open_error
from .handshake import Handshake, KernelGone, LineReader
from .host import wire
from .host.wire import LAUNCHER_CHANNEL
from .hosts import Host
from .link import ByteReader, RemoteProcess, SSHLink, StreamChannel
from .payload import BOOTSTRAP, payload_line
from .trips import trip

log = logging.getLogger(__name__)

# A launcher waiting for its spec (a spare) exits after this many seconds: over a link
# cut for good no EOF would ever end it.  The next start makes a new spare.
SPARE_WAIT = 600.0


def launcher_command(python: str) -> str:
    # exec: the shell gives its place to Python, one process fewer to signal or orphan.
    # -S: the launcher needs only the stdlib, and site start-up is a fifth of Python's.
    # -I: isolated, so a json.py in the login user's home (the cwd) is never imported,
    # and PYTHON* variables do not reach the launcher (the kernel still gets them).
    return "exec " + shlex.join([python, "-I", "-S", "-c", BOOTSTRAP, f"{SPARE_WAIT:g}"])


async def start_launcher(
    connection: SSHLink, python: str, *, spare: bool = False, entry: str = "launch"
) -> RemoteProcess:
    """Exec the launcher and send it its payload; it then waits for a spec on stdin.

    Also used ahead of time, to keep a spare launcher past the login shell's and
    Python's start-up (a login shell that runs conda or pyenv init costs 100+ ms).
    """
    process = await connection.start_process(launcher_command(python), spare=spare)
    trip(
        connection.description,
        "spare session (background)" if spare else "launcher session",
    )
    process.stdin.write(payload_line(entry))
    return process


class _SupervisionStream:
    """The launcher's control socket reached through its relay (LAUNCHER_CHANNEL), for a
    link whose sessions are scarce: a RemoteProcess with no process of its own (the
    launcher's "exit" event tells how the kernel ended), and the stream session that
    feeds it."""

    def __init__(self) -> None:
        self._stdout = asyncio.StreamReader()
        self._stderr = asyncio.StreamReader()
        self._stderr.feed_eof()  # the kernel's output stays with the launcher
        self._channel: StreamChannel | None = None
        self._closing = False
        self._closed = asyncio.Event()

    # as the stream's session
    def connection_made(self, chan: StreamChannel) -> None:
        self._channel = chan

    def session_started(self) -> None:
        pass

    def data_received(self, data: bytes, datatype: int | None) -> None:
        if not self._stdout.at_eof():
            self._stdout.feed_data(data)

    def eof_received(self) -> bool:
        self._stdout.feed_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._stdout.feed_eof()
        self._closed.set()

    def pause_writing(self) -> None:
        pass  # a few control lines: nothing to hold back

    def resume_writing(self) -> None:
        pass

    # as the launcher's process
    @property
    def stdin(self) -> _SupervisionStream:
        return self

    def write(self, data: bytes) -> None:
        if self._channel is None or self.is_closing():
            raise BrokenPipeError("the launcher's supervision stream is closed")
        self._channel.write(data)

    def write_eof(self) -> None:
        if self._channel is not None and not self.is_closing():
            self._channel.write_eof()

    @property
    def stdout(self) -> ByteReader:
        return self._stdout

    @property
    def stderr(self) -> ByteReader:
        return self._stderr

    @property
    def exit_status(self) -> int | None:
        return None

    @property
    def exit_signal(self) -> tuple[str, bool, str, str] | None:
        return None

    def is_closing(self) -> bool:
        return self._closing or self._closed.is_set()

    def close(self) -> None:
        self._closing = True
        if self._channel is not None:
            self._channel.close()

    async def wait_closed(self) -> None:
        await self._closed.wait()


async def _open_control_channel(
    connection: SSHLink,
    host: Host,
    python: str,
    handshake: Handshake,
    token: str,
    kernel_id: str,
    timeout: float,
    nonce: str,
    via_relay: bool,
) -> tuple[RemoteProcess, LineReader]:
    """A channel to the launcher's control socket, its hello (``nonce``) sent.

    Over a link that holds sessions, a session running the launcher in attach mode
    relays it.  Otherwise (an OpenSSH master: its sessions count against the server's
    MaxSessions) a stream to the launcher's relay does, after the relay has proved
    that it knows the token, and this side too.  So does a kernel the login node cannot
    reach but through its relay (``via_relay``: a Slurm compute node)."""
    if connection.holds_sessions and not via_relay:
        try:
            process = await start_launcher(connection, python, entry="reattach")
        except (asyncssh.Error, OSError) as exc:
            raise session_open_error(str(host), f"reattaching kernel {kernel_id}", exc) from exc
        request = {"attach": {"control": handshake.control, "hello": nonce}}
        process.stdin.write(wire.encode_line(request))
        return process, LineReader(process.stdout, after_login=str(host))
    if not isinstance(handshake.relay, int):
        raise KernelGone(
            f"kernel {kernel_id} on {host} cannot be reached through {connection.description} "
            f"(its launcher relays on a Unix socket)",
            host=str(host),
        )
    try:
        stream = await connection.open_tcp(
            _SupervisionStream, handshake.relay_host, handshake.relay
        )
    except (asyncssh.Error, OSError) as exc:
        raise SSHConnectError(
            f"SSH to {host}: cannot reach the launcher of kernel {kernel_id} through "
            f"{connection.description}: {exc}",
            host=str(host),
        ) from exc
    reader = LineReader(stream.stdout)
    try:
        relay_nonce = wire.new_nonce()
        stream.write(wire.encode_line(wire.hello(relay_nonce, wire.new_nonce(), LAUNCHER_CHANNEL)))
        line = await asyncio.wait_for(reader.readline(), timeout)
        try:
            answer = json.loads(line or b"{}")
            proof = wire.answer(token, "relay", relay_nonce, answer)
        except (ValueError, AttributeError, wire.ProtocolError):
            raise KernelGone(
                f"kernel {kernel_id} on {host}: the relay at port {handshake.relay} is not "
                f"its launcher's (it could not prove it knows the token)",
                host=str(host),
            ) from None
        stream.write(wire.encode_line(proof))
        stream.write(wire.encode_line({"hello": nonce}))
    except BaseException:
        stream.close()
        raise
    return stream, reader


async def control_channel(
    connection: SSHLink,
    host: Host,
    python: str,
    handshake: Handshake,
    token: str,
    kernel_id: str,
    timeout: float,
    via_relay: bool = False,
) -> tuple[RemoteProcess, LineReader]:
    """A new channel relayed to the launcher's control socket, past its "attached" event.

    The launcher proves it knows the token first (an HMAC over both sides' nonces); only
    then does this side prove it.  Whoever sits at the control path without the token
    (another user, once the real launcher is gone) learns nothing: not the token, and no
    forward is ever opened to its kernel endpoints."""
    if not handshake.control or not token:
        raise KernelGone(f"kernel {kernel_id} on {host} cannot be reattached", host=str(host))
    nonce = wire.new_nonce()
    process, reader = await _open_control_channel(
        connection, host, python, handshake, token, kernel_id, timeout, nonce, via_relay
    )

    async def next_event() -> dict[str, Any]:
        line = await asyncio.wait_for(reader.readline(), timeout)
        try:
            event = json.loads(line or b"{}")
        except ValueError:
            event = None
        if not isinstance(event, dict):
            raise KernelGone(f"kernel {kernel_id} on {host} is gone: {line!r}", host=str(host))
        return event

    trip(host, "control open")
    try:
        challenge = await next_event()
        trip(host, "control challenge")
        if "proof" not in challenge:
            raise KernelGone(
                f"kernel {kernel_id} on {host} is gone: {challenge.get('message', challenge)}",
                host=str(host),
            )
        try:
            answer = wire.answer(token, "launcher", nonce, challenge)
        except wire.ProtocolError:
            log.error(
                "kernel %s on %s: the process at %s could not prove it is the kernel's "
                "launcher (another user's?); not reattaching",
                kernel_id, host, handshake.control,
            )  # fmt: skip
            raise KernelGone(
                f"kernel {kernel_id} on {host}: the control socket {handshake.control} is "
                f"not its launcher's (it could not prove it knows the token)",
                host=str(host),
            ) from None
        process.stdin.write(wire.encode_line(answer))
        attached = await next_event()
        if attached.get("event") != "attached":
            raise KernelGone(
                f"kernel {kernel_id} on {host} refused the reattach: {attached}", host=str(host)
            )
    except KernelGone:
        process.close()
        raise
    except (asyncssh.Error, OSError, ValueError) as exc:  # TimeoutError is an OSError
        process.close()
        raise SSHConnectError(
            f"SSH to {host}: reattaching kernel {kernel_id} failed: {exc}", host=str(host)
        ) from exc
    except BaseException:
        process.close()
        raise
    return process, reader
