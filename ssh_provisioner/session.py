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
stream     one client connection to a local port, carried to the relay as resumable
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
caller is cancelled.  The seat calls into it.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import asyncssh

from .errors import HostKeyError, KernelUnreachable, SSHConnectError
from .hosts import Host
from .link import RemoteProcess
from .pool import ConnectionPool, Lease
from .remote import (
    CONNECTION_LOST_STATUS,
    SPARE_WAIT,
    Handshake,
    KernelGone,
    RemoteKernel,
    SpareExpired,
    start_launcher,
)
from .slurm import JOB_ENDED_STATUS, JobInfo, SlurmJob, SlurmSettings
from .tunnels import KernelPorts, Target

log = logging.getLogger(__name__)

T = TypeVar("T")
RECONNECT_BACKOFF_MAX = 2.0  # a link that comes back carries the kernel again at once
COMPLETING_WAIT = 15.0  # for a Slurm job's final state, to name why it ended
JOB_CANCEL_CONNECT = 10.0  # seconds to reach the login node to scancel


class State(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    UNREACHABLE = "unreachable"
    REATTACHING = "reattaching"
    ABANDONED = "abandoned"
    CLOSED = "closed"


@dataclass(frozen=True)
class SessionSettings:
    """What a session needs to know of the provisioner's configuration, resolved for
    its host."""

    kernel_id: str
    host_name: str
    host: Host
    connect_options: dict[str, Any] = field(hash=False)
    python: str
    connect_timeout: float
    launch_timeout: float
    reconnect_timeout: float
    idle_timeout: float
    ping_interval: float
    prewarm: bool
    slurm: SlurmSettings | None = None  # the kernel runs as a Slurm job, via this login node


async def cancel_job(
    pool: ConnectionPool,
    host: Host,
    options: dict[str, Any],
    job: SlurmJob,
    *,
    idle_timeout: float,
) -> None:
    """scancel a kernel's job through its login node; if the login node cannot be
    reached now, as soon as a connection to it is up again (its launcher, if one
    runs, cancels it after orphan_timeout in any case)."""

    async def cancel(lease: Lease) -> bool:
        return await job.cancel(lease.connection)

    async def attempt() -> bool:
        try:
            _, done = await pool.use(
                host, options, cancel, connect_timeout=JOB_CANCEL_CONNECT, idle_timeout=idle_timeout
            )  # the kernelspec's pool_idle_timeout: the connection is not kept longer for this
        except SSHConnectError as exc:
            log.warning(
                "kernel %s: cannot cancel Slurm job %s yet: %s", job.kernel_id, job.job_id, exc
            )
            return False
        return done

    async def later() -> None:
        await attempt()

    if not await attempt():
        pool.when_reachable(host, options, later)


class KernelSession:
    def __init__(
        self,
        settings: SessionSettings,
        pool: ConnectionPool,
        ports: KernelPorts,
        job: SlurmJob | None = None,
    ) -> None:
        self.settings = settings
        # A Slurm kernel's job: given by the provisioner for a restart (a new step in the
        # same allocation), else submitted by start().  The provisioner cancels it.
        self.job = job
        self._job_watch: asyncio.Task[None] | None = None
        self._following: asyncio.Task[None] | None = None  # the launcher's channel (_follow)
        self._reasons: set[asyncio.Future[None]] = set()
        self._pool = pool
        self._ports = ports
        self.state = State.STARTING
        self._lease: Lease | None = None
        self._kernel: RemoteKernel | None = None
        self.handshake: Handshake | None = None
        self._close_task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        where = f"{self.settings.kernel_id} on {self.settings.host_name}"
        return f"<KernelSession {where}: {self.state.value}>"

    # -- STARTING -> RUNNING ------------------------------------------------------------

    @property
    def local_ports(self) -> dict[str, int]:
        return self._ports.numbers

    async def start(self, spec: dict[str, Any]) -> None:
        """Run the launcher with ``spec``, await its handshake and relay the local ports
        to the kernel.  On failure nothing is left (the lease is released)."""
        settings = self.settings

        async def launch(lease: Lease) -> RemoteKernel:
            if settings.slurm is not None:
                return await self._launch_step(lease, spec, settings.slurm)

            async def start(spare: RemoteProcess | None) -> RemoteKernel:
                return await RemoteKernel.start(
                    lease.connection,
                    settings.host,
                    python=settings.python,
                    spec=spec,
                    kernel_id=settings.kernel_id,
                    timeout=settings.launch_timeout,
                    spare=spare,
                )

            spare = lease.take_spare(settings.python) if settings.prewarm else None
            if spare is not None:
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

    async def _launch_step(
        self, lease: Lease, spec: dict[str, Any], slurm: SlurmSettings
    ) -> RemoteKernel:
        """The kernel in a new step of its Slurm job, submitted first if there is none
        (or the last one has ended).  The time in the queue is not launch_timeout's."""
        settings = self.settings
        link = lease.connection
        job = self.job
        if job is not None and (job.cancelled or (await job.query(link)).ended):
            log.warning(
                "kernel %s: its Slurm job %s has ended (%s); submitting a new job",
                settings.kernel_id, job.job_id, job.last.describe(),
            )  # fmt: skip
            job = None
        submitted = job is None
        if job is None:
            job = self.job = await SlurmJob.submit(
                link, slurm, kernel_id=settings.kernel_id, login=settings.host_name
            )
        try:
            info = await job.wait_running(link, timeout=slurm.queue_timeout)
            node = info.nodes.split(",")[0]
            step_spec = {
                **spec,
                "relay_bind": await job.address_of(link, node),
                "cancel_job_when_orphaned": True,
            }
            notice = job.walltime_notice(info.time_left)
            if notice is not None:
                step_spec["walltime_notice"] = notice
            return await RemoteKernel.start(
                link,
                settings.host,
                python=settings.python,
                spec=step_spec,
                kernel_id=settings.kernel_id,
                timeout=settings.launch_timeout,
                command=slurm.step_command(job.job_id, settings.python, SPARE_WAIT),
            )
        except BaseException:
            if submitted:  # a job of this start only: nothing of it may remain
                self.job = None
                await asyncio.shield(
                    cancel_job(
                        self._pool,
                        settings.host,
                        settings.connect_options,
                        job,
                        idle_timeout=settings.idle_timeout,
                    )
                )
            raise

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
        kernel.keep_alive(self.settings.ping_interval)
        self._following = asyncio.create_task(self._follow(kernel))
        if self.job is not None and self.settings.slurm is not None:
            self._job_watch = asyncio.create_task(
                self._watch_job(kernel, self.job, self.settings.slurm.poll_interval)
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
                slurm = self.job is not None and self.settings.slurm is not None
                if status is None and not end.lost and slurm:
                    status = await self._explain_end()
                kernel.exited(status)
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

    async def _stop_following(self) -> None:
        task, self._following = self._following, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    # -- a Slurm kernel's job ------------------------------------------------------------

    async def _query_job(self, job: SlurmJob) -> JobInfo:
        async def query(lease: Lease) -> JobInfo:
            return await job.query(lease.connection)

        try:
            _, info = await self._use(query)
        except SSHConnectError as exc:
            return JobInfo("UNKNOWN", detail=str(exc))
        return info

    async def _watch_job(self, kernel: RemoteKernel, job: SlurmJob, interval: float) -> None:
        """Every ``interval`` seconds: has the job ended (walltime, preemption, node
        failure, scancel from outside)?  Then the kernel is dead, and the log says why.
        A Slurm that does not answer is asked again; the kernel is kept."""
        while True:
            try:
                await asyncio.wait_for(kernel.wait(), interval)
                return
            except TimeoutError:
                pass
            if self.state is not State.RUNNING:
                continue  # reconnecting: _reconnect asks Slurm when it cannot reattach
            info = await self._query_job(job)
            if info.ended:
                await kernel.ended_elsewhere(JOB_ENDED_STATUS)
                self._explain(job, info)
                return

    def _explain(self, job: SlurmJob, info: JobInfo) -> None:
        """Log why the job ended once Slurm knows, while the kernel already counts as
        dead.  aclose does not cancel it: a restart may follow at once."""
        reason = asyncio.ensure_future(self._log_job_end(job, info))
        self._reasons.add(reason)
        reason.add_done_callback(self._reasons.discard)

    async def _log_job_end(self, job: SlurmJob, info: JobInfo) -> None:
        """Why the job ended.  A job being cancelled or timed out is COMPLETING for a
        while (its steps are killed): its final state says why, so wait for that."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + COMPLETING_WAIT
        while info.state in ("COMPLETING", "UNKNOWN") and loop.time() < deadline:
            await asyncio.sleep(0.5)
            info = await self._query_job(job)
        log.warning(
            "kernel %s on %s: its Slurm job %s has ended: %s; the kernel is dead",
            self.settings.kernel_id, self.settings.host_name, job.job_id, info.describe(),
        )  # fmt: skip

    async def _explain_end(self) -> int:
        """The launcher's relay closed with the login node's connection alive: the
        step, or the whole job, has ended.  Slurm says which."""
        job = self.job
        if job is None:
            return JOB_ENDED_STATUS
        info = await self._query_job(job)
        if info.ended:
            self._explain(job, info)
        else:
            log.warning(
                "kernel %s on %s: its launcher (a step of Slurm job %s, which is %s) ended "
                "without a word; the kernel is dead",
                self.settings.kernel_id, self.settings.host_name, job.job_id, info.describe(),
            )  # fmt: skip
        return JOB_ENDED_STATUS

    def _target(self, lease: Lease, kernel: RemoteKernel) -> Target:
        ready = kernel.ready
        return Target(
            connection=lease.connection,
            relay=ready.relay,
            token=kernel.attach_token or "",
            launcher=f"{ready.launcher_pid}:{ready.runtime_dir}",
            label=f"kernel {self.settings.kernel_id} on {self.settings.host_name}",
            relay_host=ready.relay_host,
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
                if self.job is not None:
                    info = await self._query_job(self.job)
                    if info.ended:
                        await self._log_job_end(self.job, info)
                        break
            else:
                if self.state is not State.REATTACHING:  # closed or abandoned meanwhile
                    lease.release()
                    return False
                self._lease = lease
                self._ports.relay_to(self._target(lease, kernel))
                self.state = State.RUNNING
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
