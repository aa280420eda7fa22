"""RemoteKernel: the launcher running on a host, seen from here.

The launcher's SSH channel is the kernel's lifeline: its stdout carries the
handshake and the exit status, its stdin carries signals, its stderr the kernel's
own output.  ``poll`` and ``wait`` therefore need no network round trip.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import posixpath
import shlex
import signal
from dataclasses import dataclass
from typing import Any

import asyncssh

from .errors import (
    LaunchError,
    LaunchTimeout,
    RemoteCommandError,
    SSHConnectError,
    SSHProvisionerError,
    session_open_error,
)
from .host import wire
from .host.spec import LaunchSpec
from .host.supervisor import RUNTIME_DIR_PREFIX
from .host.wire import CHANNELS, LAUNCHER_CHANNEL
from .hosts import Host
from .link import ByteReader, RemoteProcess, SSHLink, StreamChannel
from .payload import BOOTSTRAP, LAUNCHER_BEGINS, NO_SPEC, payload_line

log = logging.getLogger(__name__)

MAX_LINE = 1 << 20  # a handshake or event line longer than this is hostile or broken
PREAMBLE_MAX = 4 << 20  # what a login shell may print before the launcher (skipped)
PREAMBLE_SAMPLE = 4096  # of it, kept for the log and errors
STDERR_TAIL_LINES = 40
CLOSE_GRACE = 5.0
# A launcher waiting for its spec (a spare) exits after this many seconds: over a link
# cut for good no EOF would ever end it.  The next start makes a new spare.
SPARE_WAIT = 600.0
COMMAND_NOT_FOUND = 127
CONNECTION_LOST_STATUS = 255  # what ssh(1) reports when the link, not the command, failed
LOOPBACK = "127.0.0.1"


class KernelGone(SSHProvisionerError):
    """Reattaching found no launcher: the kernel has ended."""


@dataclass(frozen=True)
class Handshake:
    """What the launcher reports once the kernel listens on all five endpoints."""

    pid: int
    pgid: int
    launcher_pid: int
    endpoints: dict[str, int | str]
    runtime_dir: str
    connection_file: str
    cwd: str
    home: str
    hostname: str
    control: str = ""  # the launcher's reattach socket
    relay: int | str = ""  # the launcher's relay: a port on the host's loopback, or a path
    relay_host: str = LOOPBACK  # where the relay's port listens (a Slurm node's address)

    @classmethod
    def from_event(cls, event: dict[str, Any]) -> Handshake:
        endpoints = event["endpoints"]
        if not isinstance(endpoints, dict) or set(endpoints) != set(CHANNELS):
            raise ValueError("endpoints must name the five kernel channels")
        return cls(
            pid=int(event["pid"]),
            pgid=int(event["pgid"]),
            launcher_pid=int(event["launcher_pid"]),
            endpoints={k: v if isinstance(v, str) else int(v) for k, v in endpoints.items()},
            runtime_dir=str(event["runtime_dir"]),
            connection_file=str(event["connection_file"]),
            cwd=str(event["cwd"]),
            home=str(event["home"]),
            hostname=str(event["hostname"]),
            control=str(event.get("control") or ""),
            relay=relay if isinstance(relay := event.get("relay") or "", str) else int(relay),
            relay_host=str(event.get("relay_host") or LOOPBACK),
        )


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
    process.stdin.write(payload_line(entry))
    return process


async def run_probe(connection: SSHLink, host: Host, command: str, timeout: float) -> str | None:
    """Output of ``command`` on the host, or None if it failed.  Raises only
    SessionLimitError: the connection is at its MaxSessions, another may do."""
    try:
        result = await asyncio.wait_for(connection.run(command), timeout)
    except asyncssh.ChannelOpenError as exc:
        raise session_open_error(str(host), "a policy probe", exc) from exc
    except (asyncssh.Error, OSError, TimeoutError) as exc:
        log.info("probe on %s failed: %s", host, exc)
        return None
    if result.exit_status != 0:
        log.debug("probe %r on %s: exit status %s", command, host, result.exit_status)
        return None
    return str(result.stdout or "")


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
) -> tuple[RemoteProcess, _LineReader]:
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
        return process, _LineReader(process.stdout, after_login=str(host))
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
    reader = _LineReader(stream.stdout)
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


async def _control_channel(
    connection: SSHLink,
    host: Host,
    python: str,
    handshake: Handshake,
    token: str,
    kernel_id: str,
    timeout: float,
    via_relay: bool = False,
) -> tuple[RemoteProcess, _LineReader]:
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

    try:
        challenge = await next_event()
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


@dataclass(frozen=True)
class ChannelEnd:
    """How the launcher's channel ended: the kernel's exit ``status`` if the launcher
    said it (or died without a word), else None; ``lost`` if the connection went too."""

    status: int | None
    lost: bool


class SpareExpired(LaunchError):
    """The spare launcher gave up waiting just as its spec was on the way: nothing
    went wrong that a fresh launcher would meet (the session starts one)."""


class _LineReader:
    """Bounded line reader: a hostile peer cannot make us buffer without limit.

    ``after_login`` (a launcher's stdout): what a login shell printed before the
    launcher's first line (LAUNCHER_BEGINS) is skipped, up to PREAMBLE_MAX bytes, and
    kept in ``preamble`` (its start) for the log and for errors."""

    def __init__(self, stream: ByteReader, *, after_login: str = "") -> None:
        self._stream = stream
        self._buffer = bytearray()
        self._label = after_login  # the host, for the log line
        self._marker = b"\n" + LAUNCHER_BEGINS.encode() + b"\n" if after_login else b""
        self.preamble = b""

    async def _skip_login_output(self) -> None:
        marker, skipped = self._marker, 0
        while True:
            found = self._buffer.find(marker)
            cut = found if found >= 0 else max(0, len(self._buffer) - len(marker) + 1)
            if len(self.preamble) < PREAMBLE_SAMPLE:
                self.preamble += bytes(self._buffer[: min(cut, PREAMBLE_SAMPLE)])
            skipped += cut
            del self._buffer[:cut]
            if found >= 0:
                del self._buffer[: len(marker)]
                self._marker = b""
                if skipped:
                    log.debug(
                        "%s: skipped %d byte(s) the login shell printed before the launcher: "
                        "%r", self._label, skipped, self.preamble[:200],
                    )  # fmt: skip
                return
            if skipped > PREAMBLE_MAX:
                raise ValueError(
                    f"more than {PREAMBLE_MAX} bytes of output before the launcher's "
                    f"(the login shell prints {self.preamble[:80]!r}...)"
                )
            chunk = await self._stream.read(65536)
            if not chunk:  # no launcher spoke: all of it was someone else's
                self._marker = b""
                self.preamble = (self.preamble + bytes(self._buffer))[:PREAMBLE_SAMPLE]
                self._buffer.clear()
                return
            self._buffer += chunk

    async def readline(self) -> bytes | None:
        if self._marker:
            await self._skip_login_output()
        while True:
            newline = self._buffer.find(b"\n")
            if newline >= 0:
                line = bytes(self._buffer[: newline + 1])
                del self._buffer[: newline + 1]
                return line
            if len(self._buffer) > MAX_LINE:
                self._buffer.clear()  # the reader may go on with what follows
                raise ValueError(f"a line longer than {MAX_LINE} bytes")
            chunk = await self._stream.read(65536)
            if not chunk:
                return None
            self._buffer += chunk


class RemoteKernel:
    """A kernel started by the launcher on ``host``; owns the launcher's channel."""

    def __init__(
        self,
        host: Host,
        connection: SSHLink,
        process: RemoteProcess,
        kernel_id: str,
        *,
        via_relay: bool = False,
    ) -> None:
        self.host = host
        self.via_relay = via_relay
        self.connection = connection
        self.kernel_id = kernel_id
        self._process = process
        self._stdout = _LineReader(process.stdout, after_login=str(host))
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._exit: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._tasks: list[asyncio.Task[None]] = []
        self._attach_token: str | None = None
        self._from_spare = False  # started by a spare launcher (see SpareExpired)
        self._stderr_task: asyncio.Task[None] | None = None
        self.handshake: Handshake | None = None

    # -- start -----------------------------------------------------------------------

    @classmethod
    async def start(
        cls,
        connection: SSHLink,
        host: Host,
        *,
        python: str,
        spec: dict[str, Any],
        kernel_id: str,
        timeout: float,
        spare: RemoteProcess | None = None,
        command: str | None = None,
    ) -> RemoteKernel:
        """Exec the launcher (or use a ``spare`` one), send it the spec, await its handshake.

        Over a link whose sessions are scarce (an OpenSSH master) the launcher detaches
        from its session, which ends once the kernel is supervised over its relay.
        ``command`` runs the launcher some other way (in a Slurm step, from the login
        node): the launcher then stays in place, supervised over its relay."""
        via_relay = command is not None
        if not connection.unix_forwarding or via_relay:
            spec = {**spec, "relay_transport": "tcp"}
        if via_relay:
            spec = {**spec, "detach": "in_place"}
        elif not connection.holds_sessions:
            spec = {**spec, "detach": True}
        spec_line = LaunchSpec(spec).to_line()  # checked before anything starts
        try:
            if command is not None:
                process = await connection.start_process(command)
                process.stdin.write(payload_line("launch"))
            else:
                process = spare or await start_launcher(connection, python)
        except (asyncssh.Error, OSError) as exc:
            raise session_open_error(str(host), "the launcher", exc) from exc
        kernel = cls(host, connection, process, kernel_id, via_relay=via_relay)
        kernel._from_spare = spare is not None
        kernel._attach_token = spec.get("attach_token")
        kernel._stderr_task = asyncio.create_task(kernel._pump_stderr())
        kernel._tasks.append(kernel._stderr_task)
        try:
            process.stdin.write(spec_line)
            try:
                event = await asyncio.wait_for(kernel._read_handshake(python), timeout)
            except TimeoutError:
                raise LaunchTimeout(
                    f"kernel {kernel_id} on {host}: not ready after {timeout:g}s "
                    f"(launch_timeout); last output: {kernel.stderr_tail or '(none)'}",
                    host=str(host),
                    stderr_tail=kernel.stderr_tail,
                ) from None
        except SSHProvisionerError:  # before OSError: LaunchTimeout is a TimeoutError
            await kernel.abort()
            raise
        except (asyncssh.Error, OSError) as exc:
            await kernel.abort()
            if spare is not None:  # its channel, not the connection, is gone
                raise SpareExpired(f"the spare launcher on {host} is gone", host=str(host)) from exc
            raise SSHConnectError(
                f"SSH to {host}: the connection failed while starting kernel {kernel_id}: {exc}",
                host=str(host),
            ) from exc
        except BaseException:
            await kernel.abort()
            raise
        kernel.handshake = event
        if not connection.holds_sessions or via_relay:
            await kernel._leave_session(python, timeout)
        return kernel

    async def _leave_session(self, python: str, timeout: float) -> None:
        """Supervise the kernel over its relay, and close the session it started in."""
        session = self._process
        try:
            self._process, self._stdout = await _control_channel(
                self.connection,
                self.host,
                python,
                self.ready,
                self._attach_token or "",
                self.kernel_id,
                timeout,
                self.via_relay,
            )
        except BaseException:
            await self.aclose()  # over the session: the kernel must not outlive this
            raise
        session.close()

    async def _read_handshake(self, python: str) -> Handshake:
        host = self.host
        try:
            line = await self._stdout.readline()
        except ValueError as exc:
            raise LaunchError(f"launcher on {host} sent {exc}", host=str(host)) from exc
        if line is None:
            if not await self.connection.check_alive():
                raise SSHConnectError(
                    f"SSH to {host}: the connection was lost before the kernel's handshake",
                    host=str(host),
                )
            status = await self._closed_status()
            await self._drain_stderr()
            if status == COMMAND_NOT_FOUND:
                raise LaunchError(
                    f"on {host}: remote_python {python!r} was not found "
                    f"(exit status 127): {self.stderr_tail}",
                    host=str(host),
                    stderr_tail=self.stderr_tail,
                )
            if status == NO_SPEC and self._from_spare and not self.stderr_tail:
                raise SpareExpired(f"the spare launcher on {host} had given up", host=str(host))
            printed = self._stdout.preamble.decode(errors="replace").strip()[-200:]
            raise LaunchError(
                f"launcher on {host} exited with status {status} before its handshake: "
                f"{self.stderr_tail or '(no output)'}"
                + (f"; its stdout: {printed!r}" if printed else ""),
                host=str(host),
                stderr_tail=self.stderr_tail,
            )
        try:
            event = json.loads(line)
            kind = event["event"]
            if kind == "ready":
                return Handshake.from_event(event)
        except (ValueError, KeyError, TypeError) as exc:
            raise LaunchError(
                f"launcher on {host} sent an invalid handshake ({exc}): {line[:200]!r}",
                host=str(host),
            ) from exc
        if kind == "error":
            stderr = str(event.get("stderr") or "")
            message = f"kernel {self.kernel_id} on {host}: {event.get('message')}"
            if stderr:
                message += f"; kernel output:\n{stderr}"
            raise LaunchError(message, host=str(host), stderr_tail=stderr)
        raise LaunchError(f"launcher on {host} sent an unexpected {kind!r} event", host=str(host))

    # -- supervision --------------------------------------------------------------------

    @classmethod
    async def reattach(
        cls,
        connection: SSHLink,
        host: Host,
        *,
        python: str,
        handshake: Handshake,
        token: str,
        kernel_id: str,
        timeout: float,
        via_relay: bool = False,
    ) -> RemoteKernel:
        """A kernel started by another process (or before a restart of this one)."""
        process, reader = await _control_channel(
            connection, host, python, handshake, token, kernel_id, timeout, via_relay
        )
        kernel = cls(host, connection, process, kernel_id, via_relay=via_relay)
        kernel._stdout = reader
        kernel._attach_token = token
        kernel.handshake = handshake
        kernel._tasks.append(asyncio.create_task(kernel._pump_stderr()))
        return kernel

    async def ended_elsewhere(self, status: int) -> None:
        """The kernel ended without its launcher's word (its Slurm job ended): stop
        following it, and report ``status``."""
        self._set_exit(status)
        self._process.close()
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()

    def _set_exit(self, status: int) -> None:
        if not self._exit.done():
            self._exit.set_result(status)

    async def follow(self) -> ChannelEnd:
        """Read the launcher's events on the current channel until it ends, and report
        how it ended.  The session decides what follows: a reattach, Slurm's word, or
        the end (``exited``)."""
        status = await self._read_events()
        if status is not None:
            return ChannelEnd(status, lost=False)
        status = await self._closed_status()
        if self._process.exit_signal is not None and not self.connection.is_closed():
            return ChannelEnd(await self._reap_after_launcher_death(), lost=False)
        lost = status is None and not await self.connection.check_alive()
        return ChannelEnd(status, lost)

    def exited(self, status: int | None) -> None:
        """The session's verdict: the kernel has ended (``None``: with the connection)."""
        if status is None:
            log.warning(
                "kernel %s on %s: the SSH connection was lost; treating the kernel as dead",
                self.kernel_id,
                self.host,
            )
            status = CONNECTION_LOST_STATUS
        self._set_exit(status)

    async def _read_events(self) -> int | None:
        """Events of the current channel until it ends; the kernel's exit status if told."""
        try:
            while (line := await self._stdout.readline()) is not None:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    event = json.loads(line)
                    if event["event"] == "exit":
                        return int(event["status"])
        except (ValueError, asyncssh.Error, OSError) as exc:
            log.warning(
                "kernel %s on %s: launcher channel failed: %s", self.kernel_id, self.host, exc
            )
        return None

    async def reattach_channel(self, connection: SSHLink, python: str, timeout: float) -> None:
        """Reattach to the launcher over ``connection`` (after the old one was lost).

        Raises KernelGone if the launcher is not there any more (the kernel ended or was
        killed as an orphan), SSHConnectError if this attempt failed.
        """
        if not self._attach_token:
            raise KernelGone(
                f"kernel {self.kernel_id} on {self.host} cannot be reattached",
                host=str(self.host),
            )
        process, reader = await _control_channel(
            connection,
            self.host,
            python,
            self.ready,
            self._attach_token,
            self.kernel_id,
            timeout,
            self.via_relay,
        )
        self.connection, self._process, self._stdout = connection, process, reader
        self._tasks.append(asyncio.create_task(self._pump_stderr()))

    async def _reap_after_launcher_death(self) -> int:
        """The launcher ended without a word (killed?): end what it supervised."""
        signal_name = (self._process.exit_signal or ("KILL", False, "", ""))[0]
        log.warning(
            "kernel %s on %s: the launcher died (signal %s); killing the kernel's process group",
            self.kernel_id,
            self.host,
            signal_name,
        )
        commands = [["kill", "-s", "KILL", "--", f"-{self.ready.pgid}"]]
        runtime_dir = self.ready.runtime_dir
        if posixpath.basename(runtime_dir).startswith(RUNTIME_DIR_PREFIX):
            commands.append(["rm", "-rf", "--", runtime_dir])
        with contextlib.suppress(asyncssh.Error, OSError, TimeoutError):
            await asyncio.wait_for(
                self.connection.run("; ".join(shlex.join(argv) for argv in commands)),
                CLOSE_GRACE,
            )
        try:
            return -signal.Signals[f"SIG{signal_name}"].value
        except KeyError:
            return CONNECTION_LOST_STATUS

    async def _pump_stderr(self) -> None:
        reader = _LineReader(self._process.stderr)
        with contextlib.suppress(asyncssh.Error, OSError):
            while True:  # drained to the end: an unread channel stalls the launcher
                try:
                    line = await reader.readline()
                except ValueError:
                    continue
                if line is None:
                    return
                text = line.decode("utf-8", "replace").rstrip("\n")
                self._stderr_tail.append(text)
                log.debug("kernel %s on %s: %s", self.kernel_id, self.host, text)

    async def _drain_stderr(self) -> None:
        """Let the launcher's last words arrive before they are quoted in an error."""
        if self._stderr_task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._stderr_task), 1.0)

    async def _closed_status(self) -> int | None:
        with contextlib.suppress(TimeoutError, asyncssh.Error, OSError):
            await asyncio.wait_for(self._process.wait_closed(), CLOSE_GRACE)
        return self._process.exit_status

    @property
    def ready(self) -> Handshake:
        """The handshake; only a started kernel has one."""
        if self.handshake is None:
            raise RuntimeError(f"kernel {self.kernel_id} on {self.host} has not started")
        return self.handshake

    @property
    def attach_token(self) -> str | None:
        return self._attach_token

    @property
    def stderr_tail(self) -> str:
        return "\n".join(self._stderr_tail)

    def poll(self) -> int | None:
        return self._exit.result() if self._exit.done() else None

    async def wait(self) -> int:
        return await asyncio.shield(self._exit)

    def keep_alive(self, interval: float) -> None:
        """Ping the launcher every ``interval`` seconds, on whichever channel is current:
        a launcher that hears nothing for its ``liveness_timeout`` counts us as gone
        (a cut link gives it no EOF) and starts its orphan countdown."""
        if interval > 0:
            self._tasks.append(asyncio.create_task(self._ping_every(interval)))

    async def _ping_every(self, interval: float) -> None:
        ping = json.dumps({"op": "ping"}).encode() + b"\n"
        while True:
            try:
                await asyncio.wait_for(asyncio.shield(self._exit), interval)
                return  # the kernel has ended
            except TimeoutError:
                pass
            if not self._process.is_closing():
                with contextlib.suppress(asyncssh.Error, OSError):
                    self._process.stdin.write(ping)

    async def send_signal(self, signum: int) -> None:
        """Signal the kernel's process group, through the launcher or a fallback exec."""
        if self._exit.done():
            return
        if not self._process.is_closing():
            name = signal.Signals(signum).name  # by name: numbers differ between systems
            request = {"op": "signal", "signum": int(signum), "name": name}
            message = json.dumps(request).encode() + b"\n"
            try:
                self._process.stdin.write(message)
                return
            except (asyncssh.Error, OSError, BrokenPipeError) as exc:
                log.info(
                    "kernel %s on %s: launcher channel unusable (%s); signalling over exec",
                    self.kernel_id,
                    self.host,
                    exc,
                )
        await self._kill_over_exec(signum)

    async def _kill_over_exec(self, signum: int) -> None:
        if self.via_relay:  # its host is not the one we have a shell on
            raise RemoteCommandError(
                f"on {self.host}: cannot signal kernel {self.kernel_id}: its launcher's "
                f"channel is closed",
                host=str(self.host),
                argv=[],
                exit_status=None,
            )
        argv = ["kill", "-s", signal.Signals(signum).name.removeprefix("SIG"), "--"]
        argv.append(f"-{self.ready.pgid}")
        try:
            result = await asyncio.wait_for(self.connection.run(shlex.join(argv)), CLOSE_GRACE)
        except (asyncssh.Error, OSError, TimeoutError) as exc:
            raise RemoteCommandError(
                f"on {self.host}: cannot signal kernel {self.kernel_id}: {exc}",
                host=str(self.host),
                argv=argv,
                exit_status=None,
            ) from exc
        if result.exit_status not in (0, 1):  # 1: the group is already gone
            stderr = str(result.stderr or "")[-500:]
            raise RemoteCommandError(
                f"on {self.host}: {shlex.join(argv)} failed with status "
                f"{result.exit_status}: {stderr}",
                host=str(self.host),
                argv=argv,
                exit_status=result.exit_status,
                stderr_tail=stderr,
            )

    # -- shutdown ---------------------------------------------------------------------

    async def abort(self) -> None:
        """Give up on a kernel that never became ready: the launcher removes everything."""
        with contextlib.suppress(asyncssh.Error, OSError):
            self._process.stdin.write_eof()
        await self._close_channel()

    async def aclose(self) -> None:
        """Wait for the launcher to finish (kernel gone, runtime dir removed), then let go.

        A kernel still running at this point is killed: nothing outlives ``cleanup``.
        """
        if not self._exit.done():
            try:
                await self.send_signal(signal.SIGKILL)
            except RemoteCommandError as exc:  # unreachable: its launcher ends it as an orphan
                log.warning("kernel %s on %s: %s", self.kernel_id, self.host, exc)
        with contextlib.suppress(asyncssh.Error, OSError):
            self._process.stdin.write_eof()
        await self._close_channel()

    async def abandon(self) -> None:
        """Stop following a kernel we cannot reach, without a word to its host (its
        launcher ends it as an orphan, or a later connection does)."""
        self._process.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._process.close()  # a reattach cut short may have opened a new channel
        self._set_exit(CONNECTION_LOST_STATUS)

    async def _close_channel(self) -> None:
        try:
            await asyncio.wait_for(self._process.wait_closed(), CLOSE_GRACE)
        except (TimeoutError, asyncssh.Error, OSError):
            log.warning(
                "kernel %s on %s: launcher did not finish within %ss; closing its channel",
                self.kernel_id,
                self.host,
                CLOSE_GRACE,
            )
            self._process.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        status = self._process.exit_status
        self._set_exit(CONNECTION_LOST_STATUS if status is None else status)
