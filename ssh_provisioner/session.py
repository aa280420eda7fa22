"""KernelSession: one kernel's remote life, on the engine's loop.

Words, each for one thing here and in docs/how-it-works.md:

kernel     the process the kernelspec's argv starts on the host.
seat       what a kernel id keeps from its first start to its final cleanup: its local
           ports, host slot and Slurm job (``seat.KernelSeat``).
session    one kernel's remote life, from its start to its shutdown or restart (this
           module); a restart is a new session in the same seat.
launcher   the stdlib-only program on the host that starts, supervises and relays for
           one session (``host/``, shipped as one payload).
relay      the launcher's end of the kernel's client connections (``host/relay``).
stream     one client connection to a local port (a channel's, or one the kernel
           opened: ``forwards``), carried to the relay as resumable
           frames: nothing is lost when its channel is (``host/wire``).
channel    one SSH channel on a link; a stream is carried by one at a time.
link       one way to reach a host: our asyncssh connection, or the user's OpenSSH
           master (``link.SSHLink``).
reattach   reaching the launcher of a running kernel again: after a lost connection
           (``_reconnect``: a new link, then reattach) or from another process (``adopt``).

A session owns the pooled-connection lease, the launcher channel (``RemoteKernel``),
the handshake, and where the seat's local ports relay to.  It moves through explicit
states::

    STARTING -> RUNNING -> UNREACHABLE -> REATTACHING -> RUNNING
                                                    \\-> ABANDONED
    any state -> CLOSED  (aclose)

Each transition is one method.  ``aclose()`` is idempotent and completes even when the
caller is cancelled.  The seat calls into it.  (Over 500 lines for that reason: the
glossary and one method per transition, each with the words that explain it.)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncssh

from .control import start_launcher
from .custody import SlurmCustody
from .errors import HostKeyError, KernelUnreachable, SSHConnectError
from .forwards import ForwardSettings, PortForwards
from .handshake import LOOPBACK, Handshake, KernelGone
from .link import RemoteProcess
from .pool import ConnectionPool, Lease
from .remote import CONNECTION_LOST_STATUS, RemoteKernel, SpareExpired
from .settings import SessionSettings
from .slurm import SlurmJob
from .status import ENDED, LINK_DOWN, RUNNING, board
from .streams import Target
from .tunnels import KernelPorts

log = logging.getLogger(__name__)

T = TypeVar("T")
RECONNECT_BACKOFF_MAX = 2.0  # a link that comes back carries the kernel again at once


class State(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    UNREACHABLE = "unreachable"
    REATTACHING = "reattaching"
    ABANDONED = "abandoned"
    CLOSED = "closed"


class KernelSession:
    """One session of a kernel (see the glossary and the diagram of its states above).

    Why one class of this size: each method is one transition, and keeping them together
    is what lets them be read against the diagram; a Slurm job's part is custody.py's."""

    def __init__(
        self,
        settings: SessionSettings,
        pool: ConnectionPool,
        ports: KernelPorts,
        job: SlurmJob | None = None,
    ) -> None:
        self.settings = settings
        slurm = settings.slurm
        self.custody = SlurmCustody(settings, slurm, pool, job) if slurm is not None else None
        self._job_watch: asyncio.Task[None] | None = None
        self._following: asyncio.Task[None] | None = None  # the launcher's channel (_follow)
        self._pool = pool
        self._ports = ports
        self.state = State.STARTING
        self._lease: Lease | None = None
        self._kernel: RemoteKernel | None = None
        self.handshake: Handshake | None = None
        self._close_task: asyncio.Task[None] | None = None
        self._forwards: PortForwards | None = None  # the ports the kernel opened
        self._forwarding: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        where = f"{self.settings.kernel_id} on {self.settings.host_name}"
        return f"<KernelSession {where}: {self.state.value}>"

    # -- STARTING -> RUNNING ------------------------------------------------------------

    def rename(self, kernel_id: str) -> None:
        """Post and log under ``kernel_id`` from now on (a pre-spawned kernel, taken)."""
        self.settings = dataclasses.replace(self.settings, kernel_id=kernel_id)
        if self._kernel is not None:
            self._kernel.kernel_id = kernel_id

    def taken(self) -> None:
        """A kernel kept ready was taken: its launcher says so from now on (check)."""
        if self._kernel is not None:
            with contextlib.suppress(asyncssh.Error, OSError):
                self._kernel.tell({"op": "taken", "kernel_id": self.settings.kernel_id})

    @property
    def job(self) -> SlurmJob | None:
        """A Slurm kernel's job (the seat keeps it across restarts)."""
        return self.custody.job if self.custody is not None else None

    @property
    def local_ports(self) -> dict[str, int]:
        return self._ports.numbers

    @property
    def forwarded_ports(self) -> dict[int, int]:
        """The host's ports the kernel opened -> where they are on this machine."""
        return dict(self._forwards.table) if self._forwards is not None else {}

    async def start(self, spec: dict[str, Any]) -> None:
        """Run the launcher with ``spec``, await its handshake and relay the local ports
        to the kernel.  On failure nothing is left (the lease is released)."""
        settings = self.settings
        loop = asyncio.get_running_loop()

        async def launch(lease: Lease) -> RemoteKernel:
            if self.custody is not None:
                return await self.custody.launch_step(lease, spec)

            async def start(spare: RemoteProcess | None) -> RemoteKernel:
                relay_known: asyncio.Future[dict[str, Any]] = loop.create_future()
                preparing = asyncio.create_task(self._prepare(lease, spec, relay_known))
                try:
                    return await RemoteKernel.start(
                        lease.connection,
                        settings.host,
                        python=settings.python,
                        spec=spec,
                        kernel_id=settings.kernel_id,
                        timeout=settings.launch_timeout,
                        spare=spare,
                        relay_known=relay_known,
                        log_level=settings.kernel_log_level,
                    )
                finally:
                    preparing.cancel()

            spare = lease.take_spare(settings.python) if settings.prewarm else None
            if spare is not None:
                board.post(settings.kernel_id, start_kind="warm")  # (for the metrics)
                try:
                    return await start(spare)
                except SpareExpired:  # it gave up waiting as the spec went out
                    log.debug(
                        "kernel %s: the spare had given up; a fresh launcher", settings.kernel_id
                    )
            return await start(None)

        lease, kernel = await self._use(launch, keep=True)
        if settings.prewarm:
            python = settings.python
            lease.prepare_spare(
                python, lambda connection: start_launcher(connection, python, spare=True)
            )
        self._running(lease, kernel)

    async def _prepare(
        self, lease: Lease, spec: dict[str, Any], relay_known: asyncio.Future[dict[str, Any]]
    ) -> None:
        """While the kernel starts: prove the ports' channels to its relay (see
        KernelPorts.prepare), so the first request need not wait for them."""
        event = await relay_known
        with contextlib.suppress(KeyError, TypeError, ValueError):  # an odd word: skip it
            relay = event["relay"]
            self._ports.prepare(
                self._target_at(
                    lease,
                    relay if isinstance(relay, str) else int(relay),
                    str(event.get("relay_host") or LOOPBACK),
                    f"{int(event['launcher_pid'])}:{event['runtime_dir']}",
                    str(spec.get("attach_token") or ""),
                    bool(event.get("answers_zmtp")),
                )
            )

    async def adopt(self, handshake: Handshake, token: str) -> None:
        """Take over a kernel that another process (or an earlier server) started."""
        settings = self.settings

        async def reattach(lease: Lease) -> RemoteKernel:
            return await self._reattach_launcher(lease, handshake, token, settings.launch_timeout)

        lease, kernel = await self._use(reattach, keep=True)
        self._running(lease, kernel)

    async def _reattach_launcher(
        self, lease: Lease, handshake: Handshake, token: str, timeout: float
    ) -> RemoteKernel:
        settings = self.settings
        return await RemoteKernel.reattach(
            lease.connection,
            settings.host,
            python=settings.python,
            handshake=handshake,
            token=token,
            kernel_id=settings.kernel_id,
            timeout=timeout,
            via_relay=settings.slurm is not None,
            log_level=settings.kernel_log_level,
        )

    async def _use(
        self,
        work: Callable[[Lease], Awaitable[T]],
        *,
        connect_timeout: float | None = None,
        keep: bool = False,
    ) -> tuple[Lease, T]:
        """``work`` on a pooled connection to the host (the pool retries on another)."""
        settings = self.settings
        return await self._pool.use(
            settings.host,
            settings.connect_options,
            work,
            connect_timeout=settings.connect_timeout
            if connect_timeout is None
            else connect_timeout,
            idle_timeout=settings.idle_timeout,
            keep=keep,
        )

    def _running(self, lease: Lease, kernel: RemoteKernel) -> None:
        self._lease, self._kernel = lease, kernel
        self.handshake = kernel.ready
        self._ports.relay_to(self._target(lease, kernel))
        self.state = State.RUNNING
        host = {"alias": self.settings.host_name, "hostname": kernel.ready.hostname}
        host.update(user=lease.connection.username, via=lease.connection.description)
        link = {"state": "connected", "since": time.time()}
        board.post(self.settings.kernel_id, host=host, link=link)
        kernel.keep_alive(self.settings.ping_interval)
        self._following = asyncio.create_task(self._follow(kernel))
        if self.settings.forwards is not None:
            self._forwarding = asyncio.create_task(self._forward(kernel, self.settings.forwards))
        if self.custody is not None:
            self._job_watch = asyncio.create_task(
                self.custody.watch(kernel, lambda: self.state is State.RUNNING)
            )

    async def _follow(self, kernel: RemoteKernel) -> None:
        """Follow the launcher's channel.  When it ends, what the kernel reports decides
        the next transition: a lost connection is reconnected and reattached (RUNNING ->
        UNREACHABLE -> ...), a Slurm step's channel that closed without a word is
        explained by Slurm, and anything else ends the kernel with its status."""
        try:
            while True:
                end = await kernel.follow()
                if kernel.poll() is not None:
                    return  # ended meanwhile (its Slurm job ended, it was abandoned)
                retry = end.lost and self.settings.reconnect_timeout > 0
                if retry and await self._reconnect(kernel):
                    continue  # reattached: follow the launcher on the new channel
                status = end.status
                if status is None and not end.lost and self.custody is not None:
                    status = await self.custody.explain_end()
                kernel.exited(status)
                self._drop_forwards()
                return
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug here must not leave poll() saying "alive" forever.
            log.exception(
                "kernel %s on %s: lost track of the launcher",
                self.settings.kernel_id, self.settings.host_name,
            )  # fmt: skip
            kernel.exited(CONNECTION_LOST_STATUS)

    async def _forward(self, kernel: RemoteKernel, settings: ForwardSettings) -> None:
        """Forward the ports the kernel opens, as the launcher reports them (also after
        a reattach, when it reports them again)."""
        label = f"kernel {self.settings.kernel_id} on {self.settings.host_name}"

        def tell(text: str) -> None:
            with contextlib.suppress(asyncssh.Error, OSError):
                kernel.tell({"op": "notice", "text": text})

        forwards = self._forwards = PortForwards(
            self._ports, settings, label, self.settings.host_name, tell
        )
        while True:
            await forwards.update(await kernel.port_reports.get())
            board.post(self.settings.kernel_id, forwards=forwards.links())

    def _drop_forwards(self) -> None:
        """The kernel has ended (or is let go of): its forwards close."""
        task, self._forwarding = self._forwarding, None
        if task is not None:
            task.cancel()
        if self._forwards is not None:
            self._forwards.close()

    async def _stop_following(self) -> None:
        task, self._following = self._following, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _target(self, lease: Lease, kernel: RemoteKernel) -> Target:
        ready = kernel.ready
        launcher = f"{ready.launcher_pid}:{ready.runtime_dir}"
        token = kernel.attach_token or ""
        return self._target_at(
            lease, ready.relay, ready.relay_host, launcher, token, ready.answers_zmtp
        )

    def _target_at(
        self,
        lease: Lease,
        relay: int | str,
        relay_host: str,
        launcher: str,
        token: str,
        answers_zmtp: bool,
    ) -> Target:
        return Target(
            connection=lease.connection,
            relay=relay,
            token=token,
            launcher=launcher,
            label=f"kernel {self.settings.kernel_id} on {self.settings.host_name}",
            relay_host=relay_host,
            answers_zmtp=answers_zmtp,
            host=self.settings.host_name,
        )

    # -- RUNNING -> UNREACHABLE -> REATTACHING -> RUNNING | ABANDONED -------------------

    async def _reconnect(self, kernel: RemoteKernel) -> bool:
        """The kernel's connection died: reconnect and reattach to its launcher, for up
        to ``reconnect_timeout`` seconds.  Meanwhile the kernel counts as alive
        (unreachable, not dead) and its local ports stay bound, holding the connections
        its clients make until it is back."""
        if self.state is not State.RUNNING:
            return False
        settings = self.settings
        self.state = State.UNREACHABLE
        self._ports.suspend()
        if self._lease is not None:
            self._lease.release()
            self._lease = None
        started = time.monotonic()
        deadline = started + settings.reconnect_timeout
        now = time.time()
        link = {"state": "down", "since": now, "retry_until": now + settings.reconnect_timeout}
        board.post(settings.kernel_id, phase=LINK_DOWN, link=link)
        log.warning(
            "kernel %s on %s: SSH connection lost; reconnecting for up to %gs",
            settings.kernel_id, settings.host_name, settings.reconnect_timeout,
        )  # fmt: skip

        async def reattach(lease: Lease) -> None:
            await kernel.reattach_channel(
                lease.connection, settings.python, settings.connect_timeout
            )

        delay = 0.25
        while (remaining := deadline - time.monotonic()) > 0:
            self.state = State.REATTACHING
            try:
                lease, _ = await self._use(
                    reattach, connect_timeout=min(settings.connect_timeout, remaining), keep=True
                )
            except (HostKeyError, KernelGone) as exc:
                log.error("kernel %s: not reattaching: %s", settings.kernel_id, exc)
                break
            except SSHConnectError as exc:
                log.info("kernel %s: still unreachable: %s", settings.kernel_id, exc)
                job = self.job
                if self.custody is not None and job is not None:
                    info = await self.custody.query(job)
                    if info.ended:
                        await self.custody.log_end(job, info)
                        break
            else:
                if self.state is not State.REATTACHING:  # closed or abandoned meanwhile
                    lease.release()
                    return False
                self._lease = lease
                self._ports.relay_to(self._target(lease, kernel))
                self.state = State.RUNNING
                link = {"state": "connected", "since": time.time(), "reattached": time.time()}
                board.post(settings.kernel_id, phase=RUNNING, link=link)
                log.warning(
                    "kernel %s on %s: reattached after %.1fs",
                    settings.kernel_id, settings.host_name, time.monotonic() - started,
                )  # fmt: skip
                return True
            self.state = State.UNREACHABLE
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, RECONNECT_BACKOFF_MAX)
        else:
            log.warning(
                "kernel %s on %s: unreachable for %gs (reconnect_timeout); counting it as dead",
                settings.kernel_id, settings.host_name, settings.reconnect_timeout,
            )  # fmt: skip
        self.state = State.ABANDONED
        link = {"state": "given-up", "since": time.time()}
        board.post(settings.kernel_id, phase=ENDED, link=link)
        return False

    # -- while it runs ------------------------------------------------------------------

    def poll(self) -> int | None:
        """The kernel's exit status, or None while it runs or is unreachable.  Reads
        state only: safe from any thread."""
        kernel = self._kernel
        return kernel.poll() if kernel is not None else 0

    async def wait(self) -> int:
        kernel = self._kernel
        return await kernel.wait() if kernel is not None else 0

    async def send_signal(self, signum: int) -> None:
        kernel = self._kernel
        if kernel is None or kernel.poll() is not None:
            return
        if self.state is not State.RUNNING:
            raise KernelUnreachable(
                f"kernel {self.settings.kernel_id} on {self.settings.host_name} is "
                f"unreachable ({self.state.value}): signal {signum} not delivered",
                host=self.settings.host_name,
            )
        await kernel.send_signal(signum)

    async def end(self, signum: int) -> None:
        """Terminate or kill the kernel.  One that cannot be reached is abandoned: it
        counts as dead at once, and its launcher on the host ends it as an orphan."""
        if self.state is State.RUNNING or self._kernel is None:
            await self.send_signal(signum)
            return
        await self.abandon()

    async def abandon(self) -> None:
        """UNREACHABLE | REATTACHING -> ABANDONED: stop reconnecting, count it dead."""
        if self.state in (State.CLOSED, State.ABANDONED, State.RUNNING):
            return
        log.warning(
            "kernel %s on %s: abandoned while unreachable",
            self.settings.kernel_id, self.settings.host_name,
        )  # fmt: skip
        self.state = State.ABANDONED
        await self._stop_following()  # a reconnect in flight ends here
        if self._kernel is not None:
            await self._kernel.abandon()
        self._ports.detach()
        if self._lease is not None:
            self._lease.release()
            self._lease = None

    @property
    def attach_token(self) -> str | None:
        return self._kernel.attach_token if self._kernel is not None else None

    # -- any state -> CLOSED ------------------------------------------------------------

    async def aclose(self) -> None:
        """End the kernel (if it still runs and can be reached), close the forwards,
        release the lease.  Idempotent; finishes even if the caller is cancelled."""
        if self._close_task is None:
            self._close_task = asyncio.ensure_future(self._close())
        await asyncio.shield(self._close_task)

    async def _close(self) -> None:
        reachable = self.state is State.RUNNING
        self.state = State.CLOSED
        if self._job_watch is not None:
            self._job_watch.cancel()
        kernel = self._kernel
        try:
            if kernel is not None:
                if reachable:
                    await kernel.aclose()  # the launcher's exit event ends _follow
                else:  # a reattach in flight ends before its forwards are dropped
                    await self._stop_following()
                    await kernel.abandon()
        finally:
            await self._stop_following()
            self._drop_forwards()
            self._ports.detach()
            if self._lease is not None:
                self._lease.release()
                self._lease = None
        if not reachable and kernel is not None and kernel.handshake is not None:
            await self._end_abandoned(kernel.handshake, kernel.attach_token or "")

    async def _end_abandoned(self, handshake: Handshake, token: str) -> None:
        """A kernel given up while its host was unreachable may still run there: end it
        now if the host is back, else as soon as a connection to the host is up again
        (its launcher ends it after orphan_timeout at the latest)."""
        settings = self.settings

        async def end(lease: Lease) -> None:
            kernel = await self._reattach_launcher(
                lease, handshake, token, settings.connect_timeout
            )
            await kernel.aclose()  # SIGKILL through its launcher, which then cleans up

        async def attempt() -> bool:
            try:
                await self._use(end)
            except KernelGone:
                return True  # ended already (orphan_timeout), or never reattachable
            except (SSHConnectError, OSError, asyncssh.Error) as exc:
                log.info("kernel %s: cannot end it yet: %s", settings.kernel_id, exc)
                return False
            log.warning(
                "kernel %s on %s: ended the kernel abandoned during the outage",
                settings.kernel_id, settings.host_name,
            )  # fmt: skip
            return True

        async def later() -> None:
            await attempt()

        if not token or not handshake.control:
            return
        if not await attempt():
            self._pool.when_reachable(settings.host, settings.connect_options, later)
