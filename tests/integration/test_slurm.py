"""Kernels as Slurm jobs on a real Slurm (Debian's slurmctld, three slurmd "compute
nodes" in namespaces of their own, two fake GPUs each), reached through a login node
that runs sshd in its own namespace.  The compute nodes run no sshd at all."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.ioloop import AsyncIOLoopKernelManager
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

from ssh_provisioner import SlurmError
from ssh_provisioner.engine import get_engine

from ..conftest import KernelSpecFactory
from ..e2e.browser import ARTIFACTS, kernel_connected, open_browser, open_lab, run_cell
from ..e2e.jupyter_server import (
    iopub_connected,
    metrics,
    start_server,
    status_until,
    write_kernelspec,
)
from ..helpers import SLEEPING_CELL, execute, wait_until
from ..kit import (
    DASHBOARD_CELL,
    INTRUDER,
    PROCESS_A,
    STOP_DASHBOARD,
    cli,
    option_args,
    running_kernel,
    take_over,
)
from ..slurm import SlurmCluster, pids_in_netns

pytestmark = [pytest.mark.sshd, pytest.mark.slurm, pytest.mark.usefixtures("no_leaks")]


@pytest.fixture
def cluster(slurm_cluster: SlurmCluster) -> SlurmCluster:
    return slurm_cluster


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


async def test_a_dashboard_on_a_compute_node_reaches_this_machine(
    make_kernelspec: KernelSpecFactory, slurm_config: dict[str, Any], cluster: SlurmCluster
) -> None:
    """A web server started in a cell on a compute node, which this machine cannot
    reach: its port is forwarded through the login node and the launcher's relay."""
    async with running_kernel(make_kernelspec, slurm_config) as (km, kc):
        out, reply = await execute(kc, DASHBOARD_CELL.format(bind="127.0.0.1", port=0, big=0))
        assert reply["status"] == "ok", reply
        port = int(out)
        deadline = time.monotonic() + 15
        while str(port) not in (info := await km.provisioner.get_provisioner_info()).get(
            "forwarded_ports", {}
        ):
            assert time.monotonic() < deadline, f"port {port} not forwarded: {info}"
            await asyncio.sleep(0.05)
        local = info["forwarded_ports"][str(port)]
        url = f"http://127.0.0.1:{local}/index.html"
        page = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=30).read())
        assert page == b"served on the host"
        await execute(kc, STOP_DASHBOARD)
    cluster.wait_queue_empty(20)


PROLOGUE = [
    "# set up the environment (a comment first, as users write one)",
    'export GREETING="hello \\ world"',
    'if [ -n "$SLURM_JOB_ID" ]; then',
    "  export IN_JOB=yes",
    "fi",
    'shout() { echo "$1" | tr a-z A-Z; }',
    "export SHOUTED=$(shout quiet)",
    "cd /",
]


@pytest.mark.parametrize("remote_cwd", [None, "/tmp"])
async def test_a_prologue_runs_as_written_and_its_cd_sets_the_cwd(
    make_kernelspec: KernelSpecFactory,
    slurm_config: dict[str, Any],
    cluster: SlurmCluster,
    remote_cwd: str | None,
) -> None:
    """A prologue as users write one (a comment, if ... fi, a shell function) runs with
    its newlines; its `cd` is the kernel's cwd unless remote_cwd says otherwise."""
    config = {**slurm_config, "slurm": {**slurm_config["slurm"], "prologue": PROLOGUE}}
    if remote_cwd is not None:
        config["remote_cwd"] = remote_cwd
    async with running_kernel(make_kernelspec, config) as (_, kc):
        out, _ = await execute(
            kc,
            "import os\n"
            "print(os.environ['GREETING'], os.environ['IN_JOB'], os.environ['SHOUTED'])\n"
            "print(os.getcwd(), 'SSHP_PROLOGUE_CWD' in os.environ)",
        )
        assert out.splitlines() == ["hello \\ world yes QUIET", f"{remote_cwd or '/'} False"]
    cluster.wait_queue_empty(20)


async def test_after_shutdown_the_login_node_connection_lasts_pool_idle_timeout(
    make_kernelspec: KernelSpecFactory, slurm_config: dict[str, Any], cluster: SlurmCluster
) -> None:
    """The job's cancel at shutdown holds the connection no longer than the
    kernelspec's pool_idle_timeout (it kept it the default 60 s)."""
    config = {**slurm_config, "pool_idle_timeout": 2}
    async with running_kernel(make_kernelspec, config) as (km, kc):
        out, _ = await execute(kc, "print('up')")
        assert out.strip() == "up"
        await km.shutdown_kernel()
    pool = get_engine().pool
    await wait_until(lambda: pool.open_connections == 0, 10, "the login node's connection to go")
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
            job = km.provisioner.seat.job
            return job is not None and job.job_id != first["job"] and km.ready.done()

        await wait_until(restarted_in_a_new_job, 60, "the kernel restarted in a new job")
        await kc.wait_for_ready(timeout=60)
        second = await where(kc)
        km.stop_restarter()
        assert second["job"] != first["job"]
        assert "submitting a new job" in caplog.text
        assert [job["id"] for job in cluster.jobs()] == [second["job"]]
    cluster.wait_queue_empty(20)


async def test_a_crashed_kernel_is_restarted_in_the_same_job(
    make_kernelspec: KernelSpecFactory, slurm_config: dict[str, Any], cluster: SlurmCluster
) -> None:
    """The restarter's restart after a crash is a new step in the allocation it has."""
    manager = AsyncIOLoopKernelManager
    async with running_kernel(make_kernelspec, slurm_config, manager) as (km, kc):
        restarted = asyncio.Event()
        km.add_restart_callback(restarted.set, "restart")
        km.stop_restarter()
        km._restarter.time_to_dead = 0.2
        km.start_restarter()
        before = await where(kc)
        kc.execute("import os; os._exit(3)")
        await asyncio.wait_for(restarted.wait(), 20)

        def restarted_kernel() -> bool:
            session = km.provisioner.seat.session
            handshake = session.handshake if session is not None else None
            return km.ready.done() and handshake is not None and handshake.pid != before["pid"]

        await wait_until(restarted_kernel, 60, "the restarted kernel")
        await kc.wait_for_ready(timeout=60)
        after = await where(kc)
        km.stop_restarter()
        assert after["job"] == before["job"]
        assert after["pid"] != before["pid"]
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
            pending = [job for job in cluster.jobs() if job["state"] == "PENDING"]
            assert len(pending) == 1
            # Slurm's scheduler names the reason once it has tried the job; the start
            # logs it as it changes, and stays pending: every GPU is taken.
            line = f"Slurm job {pending[0]['id']} is PENDING (reason: Resources)"
            await wait_until(lambda: line in caplog.text, 30, "the pending reason logged")
            assert [job["id"] for job in cluster.jobs() if job["state"] == "PENDING"] == [
                pending[0]["id"]
            ]
            assert not starting.done()
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
        assert "ssh-provisioner holds this allocation" in shown[1]  # the stored script was read
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
    }
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(3):  # take every GPU
            await stack.enter_async_context(running_kernel(make_kernelspec, config))
        # the queue's time is not the launch's: a second would never do for a queue
        ksm, name = make_kernelspec({**config, "launch_timeout": 1.0})
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


async def test_a_blip_to_the_login_node_loses_nothing(
    make_kernelspec: KernelSpecFactory, slurm_config: dict[str, Any], cluster: SlurmCluster
) -> None:
    """The login node's link is down for 8 s while a cell prints on a compute node (and
    ends, its last lines held on the node): the kernel is unreachable, not dead; it is
    reattached through the login node, and every line arrives, in order."""
    config = {
        **slurm_config,
        "connect_options": {**slurm_config["connect_options"], "keepalive_interval": 1.0},
        "connect_timeout": 2.0,
        "reconnect_timeout": 60.0,
        "orphan_timeout": 60.0,
    }
    async with running_kernel(make_kernelspec, config) as (km, kc):
        before = await where(kc)
        code = "import time\nfor i in range(40):\n    print(i, flush=True)\n    time.sleep(0.2)"
        msg_id = kc.execute(code)
        lines: list[str] = []

        async def collect() -> None:
            while True:
                message = await kc.get_iopub_msg(timeout=60)
                if message["parent_header"].get("msg_id") != msg_id:
                    continue
                if message["msg_type"] == "stream":
                    lines.extend(message["content"]["text"].split())
                if message["msg_type"] == "status" and (
                    message["content"]["execution_state"] == "idle"
                ):
                    return

        collecting = asyncio.ensure_future(collect())
        await wait_until(lambda: len(lines) >= 3, 20, "the cell's first lines")
        down = subprocess.run(["ip", "link", "set", cluster.login_veth, "down"], check=True)
        assert down.returncode == 0
        try:
            lease = km.provisioner.seat.session._lease
            await wait_until(lambda: lease.connection.is_closed(), 15, "keepalives to notice")
            assert await km.provisioner.poll() is None  # unreachable, not dead
            await asyncio.sleep(8)  # the outage itself
        finally:
            subprocess.run(["ip", "link", "set", cluster.login_veth, "up"], check=True)
        await asyncio.wait_for(collecting, 60)
        assert lines == [str(i) for i in range(40)]
        assert (await where(kc))["pid"] == before["pid"]
    cluster.wait_queue_empty(20)


async def test_another_process_reattaches_to_the_jobs_kernel(
    make_kernelspec: KernelSpecFactory,
    slurm_config: dict[str, Any],
    cluster: SlurmCluster,
    tmp_path: Path,
) -> None:
    """A server that crashed left a kernel in its job; a new process takes it over
    (load_provisioner_info carries the job id), and its shutdown cancels the job."""
    ksm, name = make_kernelspec({**slurm_config, "orphan_timeout": 60.0})
    saved = tmp_path / "provisioner-info.json"
    argv = [sys.executable, "-c", PROCESS_A, ksm.kernel_dirs[0], name, str(saved), "disabled"]
    subprocess.run(argv, check=True, timeout=120)
    info = json.loads(saved.read_text())
    assert [job["id"] for job in cluster.jobs()] == [info["slurm_job_id"]]
    km = await take_over(ksm, name, info)
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=30)
        out, _ = await execute(kc, "print(secret)")
        assert out.strip() == "kept across processes"
        assert (await where(kc))["job"] == info["slurm_job_id"]
    finally:
        kc.stop_channels()
        await km.shutdown_kernel()
    cluster.wait_queue_empty(20)


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_the_time_limit_is_announced_in_the_cell_then_ends_the_kernel(
    make_kernelspec: KernelSpecFactory,
    slurm_config: dict[str, Any],
    cluster: SlurmCluster,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A one-minute job (Slurm's shortest) with the warning 50 s ahead: a running cell
    shows it, then the kernel is dead with TIMEOUT (Slurm acts 60-90 s after start)."""
    caplog.set_level(logging.INFO, logger="ssh_provisioner")
    config = {
        **slurm_config,
        "slurm": {**slurm_config["slurm"], "time": "1", "warn_before_walltime": 50},
    }
    async with running_kernel(make_kernelspec, config) as (km, kc):
        job = (await where(kc))["job"]
        code = "import time\nfor i in range(300):\n    time.sleep(0.5)"
        msg_id = kc.execute(code)
        warning = ""
        while "time limit" not in warning:
            message = await kc.get_iopub_msg(timeout=40)
            if message["parent_header"].get("msg_id") == msg_id and (
                message["msg_type"] == "stream"
            ):
                warning += message["content"]["text"]
        assert f"Slurm job {job} reaches its time limit in about 1 min" in warning
        assert message["content"]["name"] == "stderr"
        await wait_until_dead(km, 120)
        reason = f"Slurm job {job} has ended: TIMEOUT"
        await wait_until(lambda: reason in caplog.text, 20, "the reason in the log")
    cluster.wait_queue_empty(20)


async def test_the_cli_installs_and_checks_a_slurm_kernelspec(
    slurm_config: dict[str, Any], cluster: SlurmCluster, tmp_path: Path
) -> None:
    """`install --slurm` writes the section (a typo is refused); `check` asks the
    login node: Slurm's commands, sinfo, the partition, the GPU request."""
    env = {
        "JUPYTER_PATH": str(tmp_path / "share" / "jupyter"),
        "JUPYTER_DATA_DIR": str(tmp_path / "data"),
    }
    host = slurm_config["hosts"][0]
    options = option_args(slurm_config["connect_options"])
    typo = cli("install", "gpu", "--host", host, "--slurm", "partiton=gpu", env=env)
    assert typo.returncode == 2
    assert "'partiton' (did you mean 'partition'?)" in typo.stderr
    args = ["install", "gpu", "--host", host, "--python", sys.executable,
            "--prefix", str(tmp_path), "--check", *options,
            "--slurm", "partition=gpu", "--slurm", "gpus=2", "--slurm", "time=00:10:00",
            "--slurm", "prologue=export GREETING=hi",
            "--slurm", "prologue=export TO=you"]  # fmt: skip
    installed = cli(*args, env=env)
    assert installed.returncode == 0, installed.stderr
    spec = json.loads((tmp_path / "share/jupyter/kernels/gpu/kernel.json").read_text())
    section = spec["metadata"]["kernel_provisioner"]["config"]["slurm"]
    assert section == {
        "partition": "gpu", "gpus": 2, "time": "00:10:00",
        "prologue": ["export GREETING=hi", "export TO=you"],
    }  # fmt: skip

    good = cli("check", "--host", host, *options, "--slurm", "partition=gpu", "--slurm", "gpus=2")
    assert good.returncode == 0, good.stdout + good.stderr
    assert "partition gpu: 3 node(s)" in good.stdout
    too_many = cli("check", "--host", host, *options, "--slurm", "gpus=3")
    assert too_many.returncode == 1
    assert "no node in partition gpu has 3 GPU(s) (at most 2)" in too_many.stdout
    wrong = cli("check", "--host", host, *options, "--slurm", "partition=cpu")
    assert "no partition 'cpu' (there are: gpu)" in wrong.stdout

    ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "share" / "jupyter" / "kernels")])
    installed = lambda *_, **__: (ksm, "gpu")  # noqa: E731 - the CLI wrote the kernelspec
    async with running_kernel(installed, {}) as (_, kc):
        out, _ = await execute(kc, "import os; print(os.environ['GREETING'], os.environ['TO'])")
        assert out.strip() == "hi you"  # the prologue ran before the kernel, in its shell
    cluster.wait_queue_empty(20)


async def test_an_orphaned_kernel_gives_its_allocation_back(
    make_kernelspec: KernelSpecFactory,
    slurm_config: dict[str, Any],
    cluster: SlurmCluster,
    tmp_path: Path,
) -> None:
    """The server is gone for good (it exited without a shutdown): after orphan_timeout
    the launcher ends the kernel and cancels its own job."""
    ksm, name = make_kernelspec({**slurm_config, "orphan_timeout": 3.0})
    saved = tmp_path / "provisioner-info.json"
    argv = [sys.executable, "-c", PROCESS_A, ksm.kernel_dirs[0], name, str(saved), "disabled"]
    subprocess.run(argv, check=True, timeout=120)
    job = json.loads(saved.read_text())["slurm_job_id"]
    assert [row["id"] for row in cluster.jobs()] == [job]
    await wait_until(lambda: cluster.jobs() == [], 30, "the orphan's job to be cancelled")
    assert cluster.job_field(job, "JobState") == "CANCELLED"


async def test_another_user_on_the_cluster_network_reaches_nothing_at_the_relay(
    make_kernelspec: KernelSpecFactory,
    slurm_config: dict[str, Any],
    cluster: SlurmCluster,
    test_user: str,
) -> None:
    """The relay listens on the compute node's cluster address: another user, on
    another node, connects to it and gets neither a ZMTP greeting nor a stream."""
    async with running_kernel(make_kernelspec, slurm_config) as (km, kc):
        here = await where(kc)
        handshake = (await km.provisioner.get_provisioner_info())["handshake"]
        assert handshake["relay_host"] == cluster.node(here["host"]).address
        other = next(node for node in cluster.nodes if node.name != here["host"])
        argv = ["nsenter", f"--net=/run/netns/{other.namespace}", "--",
                "runuser", "-u", test_user, "--", sys.executable, "-c", INTRUDER,
                str(handshake["relay"]), handshake["relay_host"]]  # fmt: skip
        probe = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
        assert probe.stdout.split() == ["closed", "closed"], probe.stdout + probe.stderr
        out, _ = await execute(kc, "print('still mine')")
        assert out.strip() == "still mine"
    cluster.wait_queue_empty(20)


async def test_a_kernel_of_an_ordinary_user(
    make_kernelspec: KernelSpecFactory,
    slurm_config: dict[str, Any],
    cluster: SlurmCluster,
    test_user: str,
) -> None:
    """Logged in as an unprivileged user: the job is theirs, the kernel runs as them on
    a compute node, and their shutdown cancels the job."""
    login = cluster.login
    assert login is not None
    config = {**slurm_config, "hosts": [login.destination(test_user)]}
    async with running_kernel(make_kernelspec, config) as (_, kc):
        out, _ = await execute(
            kc, "import getpass, socket; print(getpass.getuser(), socket.gethostname())"
        )
        user, host = out.split()
        assert user == test_user
        assert host in ("node1", "node2", "node3")
        job = (await where(kc))["job"]
        assert cluster.job_field(job, "UserId").startswith(f"{test_user}(")
    cluster.wait_queue_empty(20)


PENDING_THEN_GONE = """
import asyncio, os, sys
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

async def main():
    ksm = KernelSpecManager(kernel_dirs=[sys.argv[1]])
    km = AsyncKernelManager(kernel_name=sys.argv[2], kernel_spec_manager=ksm)
    await km.start_kernel()  # waits in the queue until this process is killed

asyncio.run(main())
"""


async def test_a_job_whose_server_died_in_the_queue_ends_by_itself(
    make_kernelspec: KernelSpecFactory, slurm_config: dict[str, Any], cluster: SlurmCluster
) -> None:
    """The server is killed while its kernel's job waits in the queue: nobody will
    start a kernel in it or cancel it.  Once it runs, it finds no step at two checks
    (empty_job_timeout apart) and ends, giving the allocation back."""
    config = {**slurm_config, "slurm": {**slurm_config["slurm"], "gpus": 2}}
    async with contextlib.AsyncExitStack() as stack:
        kernels = [
            await stack.enter_async_context(running_kernel(make_kernelspec, config))
            for _ in range(3)  # every GPU taken
        ]
        ksm, name = make_kernelspec(
            {**config, "slurm": {**config["slurm"], "empty_job_timeout": 2}}
        )
        server = await asyncio.create_subprocess_exec(
            sys.executable, "-c", PENDING_THEN_GONE, ksm.kernel_dirs[0], name
        )
        try:
            await wait_until(
                lambda: any(job["state"] == "PENDING" for job in cluster.jobs()), 30, "pending"
            )
        finally:
            server.kill()
            await server.wait()
        orphan = next(job["id"] for job in cluster.jobs() if job["state"] == "PENDING")
        await kernels[0][0].shutdown_kernel()  # its GPUs go to the orphan's job
        await wait_until(
            lambda: cluster.job_field(orphan, "JobState") == "RUNNING", 30, "the job to run"
        )
        await wait_until(
            lambda: cluster.job_field(orphan, "JobState") == "COMPLETED", 30, "it to end"
        )
        assert orphan not in [job["id"] for job in cluster.jobs()]
        for _, kc in kernels[1:]:  # the others' jobs, kernels running in them, are kept
            out, _ = await execute(kc, "print('kept')")
            assert out.strip() == "kept"
    cluster.wait_queue_empty(20)


async def test_a_slurm_kernel_through_jupyter_server(
    tmp_path: Path, slurm_config: dict[str, Any], slurm_cluster: SlurmCluster
) -> None:
    """POST a session with the Slurm kernelspec: the kernel runs on a compute node in
    its own job; a restart keeps the job; deleting the session ends the job."""
    path = tmp_path / "share" / "jupyter"
    write_kernelspec(path, "slurm", slurm_config)
    server = start_server(tmp_path, path)
    try:
        session = await server.request(
            "POST", "/api/sessions",
            {"path": "gpu.ipynb", "type": "notebook", "kernel": {"name": "slurm"}},
        )  # fmt: skip
        kernel_id = session["kernel"]["id"]
        channels = await server.channels(kernel_id)
        try:
            await iopub_connected(channels)
            code = "import os, socket; print(socket.gethostname(), os.environ['SLURM_JOB_ID'])"
            messages = await channels.collect(channels.execute(code))
            host, job = next(m for m in messages if m["msg_type"] == "stream")["content"][
                "text"
            ].split()
            assert host in ("node1", "node2", "node3")
            assert [row["id"] for row in slurm_cluster.jobs()] == [job]
            await server.request("POST", f"/api/kernels/{kernel_id}/restart")
            await iopub_connected(channels)
            messages = await channels.collect(channels.execute(code))
            text = next(m for m in messages if m["msg_type"] == "stream")["content"]["text"]
            assert text.split()[1] == job
        finally:
            channels.close()
        await server.request("DELETE", f"/api/sessions/{session['id']}")
        assert await server.request("GET", "/api/kernels") == []
        assert slurm_cluster.jobs() == []
    finally:
        server.stop()


async def test_jupyter_server_shows_a_queued_kernel_and_stops_it_on_shutdown(
    tmp_path: Path, slurm_config: dict[str, Any], slurm_cluster: SlurmCluster
) -> None:
    """Pending kernels, as JupyterLab sees them: three kernels choosing 2 GPUs each take
    all six; a fourth returns at once and its status says queued, with Slurm's reason,
    while its start is pending; shutting it down cancels its job then and there.  A
    choice outside the kernelspec's bounds never reaches Slurm."""
    from tornado.httpclient import HTTPClientError

    config = {**slurm_config, "user_options": {"gpus": {"min": 0, "max": 2, "default": 0}}}
    path = tmp_path / "share" / "jupyter"
    write_kernelspec(path, "slurm", config)
    server = start_server(tmp_path, path, "--MappingKernelManager.use_pending_kernels=True")
    start = "/ssh-provisioner/api/kernels"
    try:
        with pytest.raises(HTTPClientError) as refused:
            await server.request("POST", start, {"name": "slurm", "options": {"gpus": 3}})
        assert refused.value.code == 400
        assert slurm_cluster.jobs() == []  # nothing reached Slurm
        ids = []
        for _ in range(3):
            kernel = await server.request("POST", start, {"name": "slurm", "options": {"gpus": 2}})
            ids.append(kernel["id"])
        for kernel_id in ids:
            entry = await status_until(
                server, kernel_id, lambda e: e.get("phase") == "running", 90, "running"
            )
            assert entry["slurm"]["gpus"] == "2"
            assert entry["slurm"]["node"] in ("node1", "node2", "node3")
            assert entry["slurm"]["walltime_ends"] > time.time() + 25 * 60  # time 00:30:00
            assert entry["choices"] == {"gpus": 2}
        channels = await server.channels(ids[0])
        try:
            await iopub_connected(channels)
            code = "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])"
            messages = await channels.collect(channels.execute(code))
            assert any(m["content"].get("text") == "0,1\n" for m in messages)
        finally:
            channels.close()

        started = time.monotonic()
        fourth = (await server.request("POST", start, {"name": "slurm", "options": {"gpus": 2}}))[
            "id"
        ]
        assert time.monotonic() - started < 10  # pending: the server did not wait
        entry = await status_until(
            server,
            fourth,
            lambda e: e.get("phase") == "queued" and e["slurm"].get("reason") == "Resources",
            60,
            "queued for Resources",
        )
        assert entry["slurm"]["state"] == "PENDING"
        samples = await metrics(server)
        assert samples['ssh_provisioner_slurm_jobs{state="PENDING"}'] == 1
        assert samples['ssh_provisioner_slurm_jobs{state="RUNNING"}'] == 3
        job = entry["slurm"]["job_id"]
        assert job in [row["id"] for row in slurm_cluster.jobs()]
        started = time.monotonic()
        await server.request("DELETE", f"/api/kernels/{fourth}")
        assert time.monotonic() - started < 30  # not when the job would have run
        assert job not in [row["id"] for row in slurm_cluster.jobs()]
        samples = await metrics(server)
        counts = [
            v for k, v in samples.items() if k.startswith("ssh_provisioner_start_seconds_count")
        ]
        assert sum(counts) == 3  # the three that ran (cold, or queued a moment); not the fourth

        # the server stopping while a kernel is queued stops it too, and leaves no job
        fifth = (await server.request("POST", start, {"name": "slurm", "options": {"gpus": 2}}))[
            "id"
        ]
        await status_until(server, fifth, lambda e: e.get("phase") == "queued", 60, "queued")
        started = time.monotonic()
        assert server.stop() == 0
        assert time.monotonic() - started < 30
        assert all(row["state"] != "PENDING" for row in slurm_cluster.jobs())
    finally:
        server.stop()
    slurm_cluster.wait_queue_empty(30)


async def test_jupyterlab_shows_the_queue_then_the_walltime_of_a_kernel_from_its_form(
    tmp_path: Path, slurm_config: dict[str, Any], slurm_cluster: SlurmCluster
) -> None:
    """In Chromium: the resource form's 3 GPUs (above the kernelspec's bound) are refused
    in a dialog and nothing reaches Slurm.  Then 2 GPUs, while three kernels hold all
    six: the notebook opens at once and its status bar says queued, with Slurm's reason;
    once two GPUs free up the kernel runs with them, and the status bar shows the
    walltime left, highlighted (here within warn_before_walltime from the start)."""
    slurm = {**slurm_config["slurm"], "warn_before_walltime": 3600}  # time is 00:30:00
    gpus = {"gpus": {"min": 0, "max": 2, "default": 0}}
    config = {**slurm_config, "slurm": slurm, "user_options": gpus}
    path = tmp_path / "share" / "jupyter"
    write_kernelspec(path, "slurm", config)
    misspelt = {**slurm_config, "slurm": {**slurm_config["slurm"], "partition": "gpux"}}
    write_kernelspec(path, "misspelt", misspelt)
    news = tmp_path / "config/lab/user-settings/@jupyterlab/apputils-extension"
    news.mkdir(parents=True)  # no "official Jupyter news?" toast over the screenshots
    (news / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    server = start_server(tmp_path, path, "--MappingKernelManager.use_pending_kernels=True")
    start = "/ssh-provisioner/api/kernels"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        holders = []
        for _ in range(3):
            kernel = await server.request("POST", start, {"name": "slurm", "options": {"gpus": 2}})
            holders.append(kernel["id"])
        for kernel_id in holders:
            await status_until(
                server, kernel_id, lambda e: e.get("phase") == "running", 90, "running"
            )
        async with open_browser() as browser:
            page = await browser.new_page()
            url = f"{server.url}/lab?token={server.token}"
            card = await open_lab(page, url, "Remote slurm …")
            await card.click(timeout=60_000)
            await page.locator(".jp-Dialog .sshp-form input[name='gpus']").fill("3")
            await page.locator(".jp-Dialog button", has_text="Start").click()
            refusal = page.locator(".jp-Dialog-content", has_text="GPUs (gpus): '3' is outside 0-2")
            await refusal.wait_for(timeout=30_000)
            await refusal.screenshot(path=ARTIFACTS / "resource-form-refused.png")
            assert len(slurm_cluster.jobs()) == 3  # nothing reached Slurm
            await page.locator(".jp-Dialog button", has_text="Close").click()

            connected = kernel_connected(page)
            await card.click()
            await page.locator(".jp-Dialog .sshp-form input[name='gpus']").fill("2")
            await page.locator(".jp-Dialog button", has_text="Start").click()
            status = page.locator(".sshp-status")
            await status.filter(has_text="queued on gpu: Resources").wait_for(timeout=60_000)
            await page.locator("#jp-main-statusbar").screenshot(
                path=ARTIFACTS / "status-bar-queued.png"
            )
            assert not connected.done()
            # a cell run while the job waits runs once it does
            cell = asyncio.ensure_future(
                run_cell(page, "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])")
            )
            await asyncio.sleep(1)
            await server.request("DELETE", f"/api/kernels/{holders[0]}")
            await asyncio.wait_for(connected, 90)
            output = await asyncio.wait_for(cell, 90)
            await output.filter(has_text="0,1").wait_for(timeout=10_000)
            await status.filter(has_text="30 min left").wait_for(timeout=30_000)
            assert "sshp-warn" in (await status.get_attribute("class") or "")
            await page.locator("#jp-main-statusbar").screenshot(
                path=ARTIFACTS / "status-bar-walltime.png"
            )

            # a bad partition: Slurm's word for it, and which login node said it
            url = f"{server.url}/lab?reset&token={server.token}"  # a launcher again
            await (await open_lab(page, url, "Remote misspelt")).click(timeout=60_000)
            dialog = page.locator(".jp-Dialog-content", has_text="invalid partition")
            await dialog.wait_for(timeout=60_000)
            assert slurm_config["hosts"][0] in await dialog.inner_text()
            await page.close()
    finally:
        try:
            for kernel in await server.request("GET", "/api/kernels"):
                await server.request("DELETE", f"/api/kernels/{kernel['id']}")
        finally:
            # (a failed pending start once kept the server from stopping: 60 s, then
            # SIGKILL)
            started = time.monotonic()
            assert server.stop() == 0
            assert time.monotonic() - started < 30
    slurm_cluster.wait_queue_empty(30)
