"""Kernels as Slurm jobs on a real Slurm (Debian's slurmctld, three slurmd "compute
nodes" in namespaces of their own, two fake GPUs each), reached through a login node
that runs sshd in its own namespace.  The compute nodes run no sshd at all."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.ioloop import AsyncIOLoopKernelManager
from jupyter_client.manager import AsyncKernelManager

from ssh_provisioner import SlurmError

from ..conftest import IN_CI, KernelSpecFactory, connect_options
from ..helpers import SLEEPING_CELL, execute, wait_until
from ..slurm import SlurmCluster, pids_in_netns, running_cluster, slurm_missing_reason
from .test_lifecycle import running_kernel

pytestmark = [pytest.mark.sshd, pytest.mark.slurm]


@pytest.fixture(scope="module")
def cluster(client_key: tuple[Path, str]) -> Iterator[SlurmCluster]:
    reason = slurm_missing_reason()
    if reason:
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    import tempfile

    directory = Path(tempfile.mkdtemp(prefix="sshp-slurm-"))
    with running_cluster(directory / "cluster", client_key[1] + "\n") as running:
        yield running


@pytest.fixture
def slurm_config(cluster: SlurmCluster, client_key: tuple[Path, str]) -> Iterator[dict[str, Any]]:
    assert cluster.login is not None
    yield {
        "hosts": [cluster.login.destination("root")],
        "connect_options": connect_options(cluster.login, client_key[0]),
        "remote_python": sys.executable,
        "launch_timeout": 30.0,
        "orphan_timeout": 10.0,
        "slurm": {"partition": "gpu", "time": "00:30:00", "poll_interval": 1},
    }
    # every test leaves the queue empty and the nodes clean (slurmstepd, Slurm's own,
    # takes a moment to finish after a job has left the queue)
    cluster.wait_queue_empty(30)
    for node in cluster.nodes:
        node.wait_until_clean(15)


WHERE = (
    "import os, socket; print(json.dumps({'host': socket.gethostname(), "
    "'job': os.environ.get('SLURM_JOB_ID'), 'gpus': os.environ.get('CUDA_VISIBLE_DEVICES'), "
    "'pid': os.getpid()}))"
)


async def where(kc: Any) -> dict[str, Any]:
    out, reply = await execute(kc, "import json\n" + WHERE)
    assert reply["status"] == "ok", reply
    return dict(json.loads(out.strip().splitlines()[-1]))


async def test_a_kernel_runs_on_a_compute_node_with_its_gpus(
    make_kernelspec: KernelSpecFactory, slurm_config: dict[str, Any], cluster: SlurmCluster
) -> None:
    config = {**slurm_config, "slurm": {**slurm_config["slurm"], "gpus": 1}}
    async with running_kernel(make_kernelspec, config) as (km, kc):
        here = await where(kc)
        assert here["host"] in ("node1", "node2", "node3")
        jobs = cluster.jobs()
        assert [job["id"] for job in jobs] == [here["job"]]
        assert jobs[0]["state"] == "RUNNING"
        assert jobs[0]["nodes"] == here["host"]
        assert here["gpus"] == "0"
        info = await km.provisioner.get_provisioner_info()
        assert info["slurm_job_id"] == here["job"]
        out, _ = await execute(kc, "print(sum(range(10)))")
        assert out.strip() == "45"
    cluster.wait_queue_empty(20)


async def test_interrupt_restart_and_shutdown_stay_in_the_allocation(
    make_kernelspec: KernelSpecFactory, slurm_config: dict[str, Any], cluster: SlurmCluster
) -> None:
    async with running_kernel(make_kernelspec, slurm_config) as (km, kc):
        before = await where(kc)
        # interrupt a running cell: the kernel lives on
        running = asyncio.ensure_future(execute(kc, SLEEPING_CELL, timeout=30))
        await asyncio.sleep(1.0)  # the cell has started sleeping (it printed)
        await km.interrupt_kernel()
        _, reply = await asyncio.wait_for(running, 20)
        assert reply["status"] == "error"
        assert reply["ename"] == "KeyboardInterrupt"
        assert (await where(kc))["pid"] == before["pid"]
        # restart: a new kernel process in the same job
        await km.restart_kernel()
        await kc.wait_for_ready(timeout=30)
        after = await where(kc)
        assert after["job"] == before["job"]
        assert after["pid"] != before["pid"]
        assert [job["id"] for job in cluster.jobs()] == [before["job"]]
        node = cluster.node(after["host"])
    cluster.wait_queue_empty(20)
    node.wait_until_clean(20)


async def test_an_outside_scancel_is_reported_with_its_reason_and_restarted_in_a_new_job(
    make_kernelspec: KernelSpecFactory,
    slurm_config: dict[str, Any],
    cluster: SlurmCluster,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="ssh_provisioner")
    manager = AsyncIOLoopKernelManager
    async with running_kernel(make_kernelspec, slurm_config, manager) as (km, kc):
        km.stop_restarter()
        first = await where(kc)
        assert cluster.command("scancel", first["job"]).returncode == 0
        await wait_until_dead(km, 10)
        reason = f"Slurm job {first['job']} has ended: CANCELLED"
        await wait_until(lambda: reason in caplog.text, 20, "the reason in the log")
        restarted = asyncio.Event()
        km.add_restart_callback(restarted.set, "restart")
        km._restarter.time_to_dead = 0.2
        km.start_restarter()
        await asyncio.wait_for(restarted.wait(), 30)

        # the restart waits in the queue for its new job: no kernel until it runs there
        def restarted_in_a_new_job() -> bool:
            job = km.provisioner._job
            return job is not None and job.job_id != first["job"] and km.ready.done()

        await wait_until(restarted_in_a_new_job, 60, "the kernel restarted in a new job")
        await kc.wait_for_ready(timeout=60)
        second = await where(kc)
        km.stop_restarter()
        assert second["job"] != first["job"]
        assert "submitting a new job" in caplog.text
        assert [job["id"] for job in cluster.jobs()] == [second["job"]]
    cluster.wait_queue_empty(20)


async def wait_until_dead(km: Any, timeout: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while await km.provisioner.poll() is None:
        assert asyncio.get_running_loop().time() < deadline, "poll() still says alive"
        await asyncio.sleep(0.1)


async def test_gpu_jobs_spread_over_nodes_and_a_fourth_waits_in_the_queue(
    make_kernelspec: KernelSpecFactory,
    slurm_config: dict[str, Any],
    cluster: SlurmCluster,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Three nodes with two GPUs each: three kernels asking for two take all six; a
    fourth stays PENDING (starting, with Slurm's reason in the log) until one ends."""
    caplog.set_level(logging.INFO, logger="ssh_provisioner")
    config = {**slurm_config, "slurm": {**slurm_config["slurm"], "gpus": 2}}
    async with contextlib.AsyncExitStack() as stack:
        places = []
        for _ in range(3):
            km, kc = await stack.enter_async_context(running_kernel(make_kernelspec, config))
            places.append((km, await where(kc)))
        assert sorted(here["host"] for _, here in places) == ["node1", "node2", "node3"]
        assert all(here["gpus"] == "0,1" for _, here in places)
        ksm, name = make_kernelspec(config)
        fourth = AsyncKernelManager(kernel_name=name, kernel_spec_manager=ksm)
        starting = asyncio.ensure_future(fourth.start_kernel())
        try:
            await wait_until(
                lambda: any(job["state"] == "PENDING" for job in cluster.jobs()), 20, "pending"
            )
            await asyncio.sleep(2)  # it stays pending: every GPU is taken
            pending = [job for job in cluster.jobs() if job["state"] == "PENDING"]
            assert len(pending) == 1
            assert not starting.done()
            assert f"Slurm job {pending[0]['id']} is PENDING (reason: Resources)" in caplog.text
            freed_km, freed = places[0]
            await freed_km.shutdown_kernel()
            await asyncio.wait_for(starting, 60)
            kc = fourth.client()
            kc.start_channels()
            try:
                await kc.wait_for_ready(timeout=30)
                here = await where(kc)
                assert here["job"] == pending[0]["id"]
                assert here["host"] == freed["host"]
            finally:
                kc.stop_channels()
        finally:
            if not starting.done():
                starting.cancel()
                await asyncio.gather(starting, return_exceptions=True)
            await fourth.shutdown_kernel(now=True)
    cluster.wait_queue_empty(20)


async def test_a_slurm_that_stops_answering_keeps_the_kernel(
    make_kernelspec: KernelSpecFactory,
    slurm_config: dict[str, Any],
    cluster: SlurmCluster,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """slurmctld gone for a while: every job-state check fails, none of them counts
    as "the job is gone" (batchspawner#179); the kernel keeps running meanwhile."""
    caplog.set_level(logging.INFO, logger="ssh_provisioner")
    async with running_kernel(make_kernelspec, slurm_config) as (km, kc):
        before = await where(kc)
        cluster.stop_controller()
        try:
            failed_check = "Slurm did not say how job"
            await wait_until(lambda: failed_check in caplog.text, 20, "a failed check")
            await asyncio.sleep(3 * slurm_config["slurm"]["poll_interval"])
            assert await km.provisioner.poll() is None
            assert (await where(kc))["pid"] == before["pid"]
        finally:
            cluster.start_controller()
        assert await km.provisioner.poll() is None
        out, _ = await execute(kc, "print('still here')")
        assert out.strip() == "still here"
    cluster.wait_queue_empty(20)


async def test_the_secrets_are_nowhere_slurm_or_other_processes_could_show_them(
    make_kernelspec: KernelSpecFactory, slurm_config: dict[str, Any], cluster: SlurmCluster
) -> None:
    async with running_kernel(make_kernelspec, slurm_config) as (km, kc):
        here = await where(kc)
        info = await km.provisioner.get_provisioner_info()
        secrets_ = [km.session.key, info["attach_token"].encode()]
        shown = [
            cluster.command("scontrol", "show", "job", "-dd", here["job"]).stdout,
            cluster.command("scontrol", "write", "batch_script", here["job"], "-").stdout,
            cluster.command("squeue", "-h", "-j", here["job"], "-o", "%all").stdout,
        ]
        assert "while :; do sleep 3600; done" in shown[1]  # the stored script was read
        for text in shown:
            assert not any(secret.decode() in text for secret in secrets_)
        # everything Slurm stored (job scripts, environments, state) and every process's
        # environment and command line on every node and on the login node
        for path in cluster.directory.rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                assert not any(secret in data for secret in secrets_), path
        namespaces = [node.namespace for node in cluster.nodes] + [cluster.login_namespace]
        for namespace in namespaces:
            for pid in pids_in_netns(namespace):
                for name in ("environ", "cmdline"):
                    with contextlib.suppress(OSError):
                        data = Path(f"/proc/{pid}/{name}").read_bytes()
                        assert not any(secret in data for secret in secrets_), (pid, name)
    cluster.wait_queue_empty(20)


async def test_a_queue_timeout_cancels_the_job_and_says_so(
    make_kernelspec: KernelSpecFactory, slurm_config: dict[str, Any], cluster: SlurmCluster
) -> None:
    """A job that cannot start (more GPUs than any node has) waits queue_timeout at
    most; then the start fails naming the job and Slurm's reason, and the job is gone."""
    config = {
        **slurm_config,
        "slurm": {**slurm_config["slurm"], "gpus": 2, "queue_timeout": 3, "mem": "3900"},
        "launch_timeout": 1.0,  # the queue's time is not the launch's
    }
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(3):  # take every GPU
            await stack.enter_async_context(running_kernel(make_kernelspec, config))
        ksm, name = make_kernelspec(config)
        km = AsyncKernelManager(kernel_name=name, kernel_spec_manager=ksm)
        with pytest.raises(SlurmError, match=r"still PENDING \(Resources\) after 3s") as raised:
            await km.start_kernel()
        assert raised.value.host == slurm_config["hosts"][0]
        assert raised.value.job_id not in [job["id"] for job in cluster.jobs()]
    cluster.wait_queue_empty(20)


async def test_a_bad_partition_is_a_clear_error_leaving_nothing(
    make_kernelspec: KernelSpecFactory, slurm_config: dict[str, Any], cluster: SlurmCluster
) -> None:
    config = {**slurm_config, "slurm": {**slurm_config["slurm"], "partition": "gpux"}}
    ksm, name = make_kernelspec(config)
    km = AsyncKernelManager(kernel_name=name, kernel_spec_manager=ksm)
    with pytest.raises(SlurmError, match=r"sbatch on root@.* refused the job .*invalid partition"):
        await km.start_kernel()
    assert cluster.jobs() == []


async def test_a_typo_in_the_slurm_section_names_the_option() -> None:
    from ssh_provisioner import ProvisionerConfigError, SSHProvisioner

    with pytest.raises(ProvisionerConfigError, match=r"'partiton' \(did you mean 'partition'\?\)"):
        SSHProvisioner(hosts=["login"], slurm={"partiton": "gpu"})
