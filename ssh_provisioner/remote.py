"""RemoteKernel: the launcher running on a host, seen from here.

The launcher's SSH channel is the kernel's lifeline: its stdout carries the
handshake and the exit status, its stdin carries signals, its stderr the kernel's
own output.  ``poll`` and ``wait`` therefore need no network round trip.

Why this module is over 500 lines: it is one class, ``RemoteKernel``, the one owner of
that channel (its docstring says why it stays whole); starting and reaching a launcher
are control.py's, its handshake handshake.py's.
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

from .control import control_channel, start_launcher
from .errors import (
    LaunchError,
    LaunchTimeout,
    RemoteCommandError,
    SSHConnectError,
    SSHProvisionerError,
    session_open_error,
)
from .handshake import Handshake, KernelGone, LineReader
from .host.spec import LaunchSpec
from .host.supervisor import RUNTIME_DIR_PREFIX
from .hosts import Host
from .link import RemoteProcess, SSHLink
from .payload import NO_SPEC, payload_line
from .trips import trip

log = logging.getLogger(__name__)

STDERR_TAIL_LINES = 50
CLOSE_GRACE = 5.0
COMMAND_NOT_FOUND = 127
CONNECTION_LOST_STATUS = 255  # what ssh(1) reports when the link, not the command, failed


@dataclass(frozen=True)
class ChannelEnd:
    """How the launcher's channel ended: the kernel's exit ``status`` if the launcher
    said it (or died without a word), else None; ``lost`` if the connection went too."""

    status: int | None
    lost: bool


class SpareExpired(LaunchError):
    """The spare launcher gave up waiting just as its spec was on the way: nothing
    went wrong that a fresh launcher would meet (the session starts one)."""


class RemoteKernel:
    """A kernel started by the launcher on ``host``; owns the launcher's channel.

    Why one class of this size: every method reads, writes or ends that one channel (its
    event lines, its stderr tail, its exit), and starting, following, signalling and
    closing are the channel's life in order.  It reports what happened (``follow``) and
    never decides what follows: that is the session's."""

    def __init__(
        self,
        host: Host,
        connection: SSHLink,
        process: RemoteProcess,
        kernel_id: str,
        *,
        via_relay: bool = False,
        log_level: int = logging.DEBUG,
    ) -> None:
        self.host = host
        self.via_relay = via_relay
        self.log_level = log_level  # of the kernel's stderr lines (kernel_log_level)
        self.connection = connection
        self.kernel_id = kernel_id
        self._process = process
        self._stdout = LineReader(process.stdout, after_login=str(host))
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._exit: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._tasks: list[asyncio.Task[None]] = []
        self._attach_token: str | None = None
        self._from_spare = False  # started by a spare launcher (see SpareExpired)
        self._relay_known: asyncio.Future[dict[str, Any]] | None = None  # its early word
        self._stderr_task: asyncio.Task[None] | None = None
        self.handshake: Handshake | None = None
        # The ports the kernel listens on, as the launcher reports each change (watch_ports)
        self.port_reports: asyncio.Queue[dict[int, str]] = asyncio.Queue()

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
        relay_known: asyncio.Future[dict[str, Any]] | None = None,
        log_level: int = logging.DEBUG,
    ) -> RemoteKernel:
        """Exec the launcher (or use a ``spare`` one), send it the spec, await its handshake.

        Over a link whose sessions are scarce (an OpenSSH master) the launcher detaches
        from its session, which ends once the kernel is supervised over its relay.
        ``command`` runs the launcher some other way (in a Slurm step, from the login
        node): the launcher then stays in place, supervised over its relay.
        ``relay_known`` gets the launcher's early word on its relay, which listens while
        the kernel starts (the ports prove their channels meanwhile)."""
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
        kernel = cls(host, connection, process, kernel_id, via_relay=via_relay, log_level=log_level)
        kernel._from_spare = spare is not None
        kernel._relay_known = relay_known
        kernel._attach_token = spec.get("attach_token")
        kernel._stderr_task = asyncio.create_task(kernel._pump_stderr())
        kernel._tasks.append(kernel._stderr_task)
        try:
            process.stdin.write(spec_line)
            try:
                event = await asyncio.wait_for(kernel._read_handshake(python), timeout)
                trip(host, "spec -> handshake")
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
            self._process, self._stdout = await control_channel(
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
        while True:
            event = await self._read_event(python)
            if event.get("event") != "relay":
                return self._handshake_of(event)
            known = self._relay_known
            if known is not None and not known.done():
                known.set_result(event)

    async def _read_event(self, python: str) -> dict[str, Any]:
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
            if not isinstance(event, dict):
                raise TypeError("not an object")
        except (ValueError, TypeError) as exc:
            raise LaunchError(
                f"launcher on {host} sent an invalid handshake ({exc}): {line[:200]!r}",
                host=str(host),
            ) from exc
        return event

    def _handshake_of(self, event: dict[str, Any]) -> Handshake:
        host = self.host
        kind = event.get("event")
        try:
            if kind == "ready":
                return Handshake.from_event(event)
        except (ValueError, KeyError, TypeError) as exc:
            raise LaunchError(
                f"launcher on {host} sent an invalid handshake ({exc}): {str(event)[:200]!r}",
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
        log_level: int = logging.DEBUG,
    ) -> RemoteKernel:
        """A kernel started by another process (or before a restart of this one)."""
        process, reader = await control_channel(
            connection, host, python, handshake, token, kernel_id, timeout, via_relay
        )
        kernel = cls(host, connection, process, kernel_id, via_relay=via_relay, log_level=log_level)
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
                    if event["event"] == "ports":
                        ports = {int(port): str(at) for port, at in event["ports"].items()}
                        self.port_reports.put_nowait(ports)
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
        process, reader = await control_channel(
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
        reader = LineReader(self._process.stderr)
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
                log.log(self.log_level, "kernel %s on %s: %s", self.kernel_id, self.host, text)

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
            try:
                self.tell({"op": "signal", "signum": int(signum), "name": name})
                return
            except (asyncssh.Error, OSError, BrokenPipeError) as exc:
                log.info(
                    "kernel %s on %s: launcher channel unusable (%s); signalling over exec",
                    self.kernel_id,
                    self.host,
                    exc,
                )
        await self._kill_over_exec(signum)

    def tell(self, request: dict[str, Any]) -> None:
        """A control line to the launcher (host/main.py lists them)."""
        self._process.stdin.write(json.dumps(request).encode() + b"\n")

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
