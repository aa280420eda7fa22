"""SlurmCustody: a Slurm kernel's job, in one place.

Submit it (or take over the job a restart runs in again), run the kernel's launcher as
a step of it, watch it while the kernel runs, explain its end (walltime, preemption,
node failure, scancel from outside), and cancel it: now, or once the login node can be
reached again.  A session of a Slurm kernel holds one; the seat keeps the job across
restarts and cancels it at the final cleanup (``cancel_job``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from .control import SPARE_WAIT
from .errors import SSHConnectError
from .hosts import Host
from .pool import ConnectionPool, Lease
from .remote import RemoteKernel
from .settings import SessionSettings
from .slurm import JOB_ENDED_STATUS, JobInfo, SlurmJob, SlurmSettings

log = logging.getLogger(__name__)

COMPLETING_WAIT = 15.0  # for a Slurm job's final state, to name why it ended
JOB_CANCEL_CONNECT = 10.0  # seconds to reach the login node to scancel


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


class SlurmCustody:
    def __init__(
        self,
        settings: SessionSettings,
        slurm: SlurmSettings,
        pool: ConnectionPool,
        job: SlurmJob | None,
    ) -> None:
        self.settings, self.slurm, self._pool = settings, slurm, pool
        # Given for a restart (a new step in the same allocation), else submitted by
        # launch_step.  The seat cancels it.
        self.job = job
        self._reasons: set[asyncio.Future[None]] = set()

    async def cancel(self, job: SlurmJob) -> None:
        settings = self.settings
        await cancel_job(
            self._pool, settings.host, settings.connect_options, job,
            idle_timeout=settings.idle_timeout,
        )  # fmt: skip

    async def launch_step(self, lease: Lease, spec: dict[str, Any]) -> RemoteKernel:
        """The kernel in a new step of its Slurm job, submitted first if there is none
        (or the last one has ended).  The time in the queue is not launch_timeout's."""
        settings, slurm = self.settings, self.slurm
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
                log_level=settings.kernel_log_level,
            )
        except BaseException:
            if submitted:  # a job of this start only: nothing of it may remain
                self.job = None
                await asyncio.shield(self.cancel(job))
            raise

    async def query(self, job: SlurmJob) -> JobInfo:
        """The job's state, or UNKNOWN (and why) if the login node cannot be asked."""

        async def query(lease: Lease) -> JobInfo:
            return await job.query(lease.connection)

        settings = self.settings
        try:
            _, info = await self._pool.use(
                settings.host,
                settings.connect_options,
                query,
                connect_timeout=settings.connect_timeout,
                idle_timeout=settings.idle_timeout,
            )
        except SSHConnectError as exc:
            return JobInfo("UNKNOWN", detail=str(exc))
        return info

    async def watch(self, kernel: RemoteKernel, reachable: Callable[[], bool]) -> None:
        """Every ``poll_interval`` seconds: has the job ended (walltime, preemption, node
        failure, scancel from outside)?  Then the kernel is dead, and the log says why.
        A Slurm that does not answer is asked again; the kernel is kept."""
        job, interval = self.job, self.slurm.poll_interval
        if job is None:
            return
        while True:
            try:
                await asyncio.wait_for(kernel.wait(), interval)
                return
            except TimeoutError:
                pass
            if not reachable():
                continue  # reconnecting: the session asks when it cannot reattach
            info = await self.query(job)
            if info.ended:
                await kernel.ended_elsewhere(JOB_ENDED_STATUS)
                self.explain(job, info)
                return

    def explain(self, job: SlurmJob, info: JobInfo) -> None:
        """Log why the job ended once Slurm knows, while the kernel already counts as
        dead.  The session's close does not cancel it: a restart may follow at once."""
        reason = asyncio.ensure_future(self.log_end(job, info))
        self._reasons.add(reason)
        reason.add_done_callback(self._reasons.discard)

    async def log_end(self, job: SlurmJob, info: JobInfo) -> None:
        """Why the job ended.  A job being cancelled or timed out is COMPLETING for a
        while (its steps are killed): its final state says why, so wait for that."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + COMPLETING_WAIT
        while info.state in ("COMPLETING", "UNKNOWN") and loop.time() < deadline:
            await asyncio.sleep(0.5)
            info = await self.query(job)
        log.warning(
            "kernel %s on %s: its Slurm job %s has ended: %s; the kernel is dead",
            self.settings.kernel_id, self.settings.host_name, job.job_id, info.describe(),
        )  # fmt: skip

    async def explain_end(self) -> int:
        """The launcher's relay closed with the login node's connection alive: the
        step, or the whole job, has ended.  Slurm says which."""
        job = self.job
        if job is None:
            return JOB_ENDED_STATUS
        info = await self.query(job)
        if info.ended:
            self.explain(job, info)
        else:
            log.warning(
                "kernel %s on %s: its launcher (a step of Slurm job %s, which is %s) ended "
                "without a word; the kernel is dead",
                self.settings.kernel_id, self.settings.host_name, job.job_id, info.describe(),
            )  # fmt: skip
        return JOB_ENDED_STATUS
