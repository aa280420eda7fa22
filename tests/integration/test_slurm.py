"""Kernels as Slurm jobs on a real Slurm (Debian's slurmctld, three slurmd "compute
nodes" in namespaces of their own, two fake GPUs each), reached through a login node
that runs sshd in its own namespace.  The compute nodes run no sshd at all."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..conftest import IN_CI, KernelSpecFactory, connect_options
from ..helpers import SLEEPING_CELL, execute, wait_until
from ..slurm import SlurmCluster, running_cluster, slurm_missing_reason
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
    # every test leaves the queue empty and the nodes clean
    cluster.wait_queue_empty(30)
    for node in cluster.nodes:
        assert node.processes() == [], f"left on {node.name}: {node.processes()}"


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
        assert jobs[0]["state"] == "RUNNING" and jobs[0]["nodes"] == here["host"]
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
        assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt"
        assert (await where(kc))["pid"] == before["pid"]
        # restart: a new kernel process in the same job
        await km.restart_kernel()
        await kc.wait_for_ready(timeout=30)
        after = await where(kc)
        assert after["job"] == before["job"] and after["pid"] != before["pid"]
        assert [job["id"] for job in cluster.jobs()] == [before["job"]]
        node = cluster.node(after["host"])
    cluster.wait_queue_empty(20)
    await wait_until(lambda: node.processes() == [], 20, "nothing left on the node")
