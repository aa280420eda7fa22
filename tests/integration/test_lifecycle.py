"""A real AsyncKernelManager runs a real ipykernel through real sshd, as root and as a user."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.asynchronous import AsyncKernelClient
from jupyter_client.ioloop import AsyncIOLoopKernelManager
from jupyter_client.manager import AsyncKernelManager

from ssh_provisioner.engine import get_engine

from ..conftest import KernelSpecFactory
from ..helpers import (
    SLEEPING_CELL,
    cmdlines_containing,
    execute,
    listening_ports,
    past_the_error,
    process_alive,
    wait_until,
)
from ..kit import kernel_pid, running_kernel
from ..leaks import launchers_under, own_listeners
from ..sshd import SSHDaemon

pytestmark = [pytest.mark.sshd, pytest.mark.usefixtures("no_leaks")]


async def test_kernel_runs_under_ssh_as_the_login_user(
    make_kernelspec: KernelSpecFactory, host_config: dict[str, Any], login: str
) -> None:
    async with running_kernel(make_kernelspec, host_config) as (km, kc):
        code = "import os, pwd; print(os.environ['SSH_CONNECTION'], pwd.getpwuid(os.getuid())[0])"
        out, reply = await execute(kc, code)
        assert reply["status"] == "ok"
        ssh_connection, user = out.split()[-5:-1], out.split()[-1]
        assert ssh_connection[2] == "127.0.0.2"
        assert user == login
        info = await km.provisioner.get_provisioner_info()
        assert info["host"] == host_config["hosts"][0]
        assert process_alive(info["pid"])
        assert Path(info["runtime_dir"]).is_dir()
        # connection info points at this machine's ends of the forwards
        assert km.get_connection_info()["ip"] == "127.0.0.1"
        assert km.get_connection_info()["shell_port"] not in info["endpoints"].values()


async def test_host_environment_survives_the_servers_env(
    make_kernelspec: KernelSpecFactory, host_config: dict[str, Any]
) -> None:
    """Jupyter Server hands the kernel its whole os.environ; only KERNEL_* and allow-listed
    names may cross, and the kernelspec env / remote_env apply on top of the host's."""
    config = {
        **host_config,
        "forward_env": ["LC_SSHP_*"],
        "remote_env": {"FROM_REMOTE_ENV": "r:${HOME}"},
    }
    ksm, name = make_kernelspec(config, env={"FROM_SPEC": "spec:${PATH}"})
    km = AsyncKernelManager(kernel_name=name, kernel_spec_manager=ksm)
    server_env = {
        "PATH": "/only/on/the/server/bin",
        "HOME": "/only/on/the/server/home",
        "SERVER_SECRET": "must-not-cross",
        "KERNEL_USERNAME": "alice",
        "JPY_SESSION_NAME": "nb.ipynb",
        "LC_SSHP_EXTRA": "allowed",
    }
    await km.start_kernel(env=server_env)
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=30)
        names = [
            "PATH",
            "HOME",
            "SERVER_SECRET",
            "KERNEL_USERNAME",
            "JPY_SESSION_NAME",
            "LC_SSHP_EXTRA",
            "FROM_SPEC",
            "FROM_REMOTE_ENV",
        ]
        out, _ = await execute(
            kc, f"import os, json; print(json.dumps({{n: os.environ.get(n) for n in {names!r}}}))"
        )
        import json

        env = json.loads(out)
        assert env["PATH"] != "/only/on/the/server/bin"
        assert "/usr/bin" in env["PATH"]
        assert env["HOME"] != "/only/on/the/server/home"
        assert env["SERVER_SECRET"] is None
        assert env["KERNEL_USERNAME"] == "alice"
        assert env["JPY_SESSION_NAME"] == "nb.ipynb"
        assert env["LC_SSHP_EXTRA"] == "allowed"
        assert env["FROM_SPEC"] == "spec:" + env["PATH"]  # ${PATH} is the host's
        assert env["FROM_REMOTE_ENV"] == "r:" + env["HOME"]
    finally:
        kc.stop_channels()
        await km.shutdown_kernel()


@pytest.mark.parametrize("interrupt_mode", ["signal", "message"])
async def test_interrupt_stops_a_sleeping_cell(
    make_kernelspec: KernelSpecFactory, host_config: dict[str, Any], interrupt_mode: str
) -> None:
    async with running_kernel(make_kernelspec, host_config, interrupt_mode=interrupt_mode) as (
        km,
        kc,
    ):
        msg_id = kc.execute(SLEEPING_CELL)
        await wait_for_output(kc, msg_id)  # the cell runs (see wait_for_output)
        started = time.monotonic()
        await km.interrupt_kernel()
        reply = await kc.get_shell_msg(timeout=10)
        elapsed = time.monotonic() - started
        assert reply["parent_header"]["msg_id"] == msg_id
        assert reply["content"]["status"] == "error"
        assert reply["content"]["ename"] == "KeyboardInterrupt"
        assert elapsed < 2.0, f"interrupt took {elapsed:.2f}s"
        await past_the_error(kc, msg_id)
        out, after = await execute(kc, "print('still alive')")
        assert after["status"] == "ok", after  # (a second SIGINT would show here)
        assert out.strip() == "still alive"


async def wait_for_output(kc: AsyncKernelClient, msg_id: str) -> None:
    """Until the cell prints: a SIGINT that lands earlier, while ipykernel still sets up
    the execution, can be lost (a local kernel has the same race)."""

    async def seen() -> None:
        while True:
            msg = await kc.get_iopub_msg(timeout=10)
            if msg["msg_type"] == "stream" and msg["parent_header"].get("msg_id") == msg_id:
                return

    await asyncio.wait_for(seen(), 10)


async def test_restart_gives_a_new_process_and_ends_the_old(
    make_kernelspec: KernelSpecFactory, host_config: dict[str, Any]
) -> None:
    async with running_kernel(make_kernelspec, host_config) as (km, kc):
        old_pid = await kernel_pid(kc)
        old_dir = (await km.provisioner.get_provisioner_info())["runtime_dir"]
        await km.restart_kernel()
        await kc.wait_for_ready(timeout=30)
        new_pid = await kernel_pid(kc)
        assert new_pid != old_pid
        assert not process_alive(old_pid)
        assert not Path(old_dir).exists()
        out, _ = await execute(kc, "print(6 * 7)")
        assert out.strip() == "42"


async def test_kernel_that_dies_is_reported_and_restarted(
    make_kernelspec: KernelSpecFactory, host_config: dict[str, Any]
) -> None:
    async with running_kernel(make_kernelspec, host_config, AsyncIOLoopKernelManager) as (km, kc):
        restarted = asyncio.Event()
        km.add_restart_callback(restarted.set, "restart")
        km.stop_restarter()
        km._restarter.time_to_dead = 0.2  # poll often; the default is 3 s
        km.start_restarter()
        old_pid = await kernel_pid(kc)
        kc.execute("import os; os._exit(3)")
        await wait_until(lambda: not process_alive(old_pid), 10, "the kernel to exit")
        # poll() reports the kernel's own exit status (or the restarter already acted)
        status = await km.provisioner.poll()
        assert status in (3, None)
        await asyncio.wait_for(restarted.wait(), 20)
        await kc.wait_for_ready(timeout=30)
        assert await kernel_pid(kc) != old_pid
        km.stop_restarter()


async def test_exit_status_is_the_kernels_own(
    make_kernelspec: KernelSpecFactory, host_config: dict[str, Any]
) -> None:
    async with running_kernel(make_kernelspec, host_config) as (km, kc):
        kc.execute("import os; os._exit(3)")
        await asyncio.wait_for(km.provisioner.wait(), 10)
        assert await km.provisioner.poll() == 3


async def test_kernel_that_ignores_shutdown_is_killed(
    make_kernelspec: KernelSpecFactory, host_config: dict[str, Any]
) -> None:
    async with running_kernel(make_kernelspec, host_config) as (km, kc):
        pid = await kernel_pid(kc)
        _, reply = await execute(
            kc,
            "import signal\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "kernel = get_ipython().kernel\n"
            "async def ignore(*args, **kwargs): pass\n"
            "kernel.control_handlers['shutdown_request'] = ignore\n",
        )
        assert reply["status"] == "ok"
        km.shutdown_wait_time = 2.0
        started = time.monotonic()
        await km.shutdown_kernel()
        assert not process_alive(pid)
        assert time.monotonic() - started < 10


async def test_shutdown_leaves_nothing_on_either_side(
    make_kernelspec: KernelSpecFactory, host_config: dict[str, Any]
) -> None:
    async with running_kernel(make_kernelspec, host_config) as (km, _):
        info = await km.provisioner.get_provisioner_info()
        local = km.get_connection_info()
        local_ports = {local[f"{c}_port"] for c in ("shell", "iopub", "stdin", "control", "hb")}
        remote_ports = set(info["endpoints"].values())
        assert local_ports <= own_listeners()  # this process holds them
        assert remote_ports <= listening_ports()
        key = km.session.key
        assert cmdlines_containing(key) == [], "the session key is on a command line"
        connection_file = Path(info["remote_connection_file"])
        assert oct(connection_file.stat().st_mode & 0o777) == oct(0o600)
        assert oct(Path(info["runtime_dir"]).stat().st_mode & 0o777) == oct(0o700)
    assert not process_alive(info["pid"])
    assert not process_alive(info["launcher_pid"])
    assert not Path(info["runtime_dir"]).exists()
    # (the kernel that held the remote ports is gone, above; another test may bind the
    # same numbers since, on this shared machine)
    assert not local_ports & own_listeners()
    assert not os.path.exists(km.connection_file)


async def test_ipc_transport(
    make_kernelspec: KernelSpecFactory, host_config: dict[str, Any]
) -> None:
    config = {**host_config, "remote_transport": "ipc"}
    async with running_kernel(make_kernelspec, config) as (km, kc):
        info = await km.provisioner.get_provisioner_info()
        for endpoint in info["endpoints"].values():
            assert isinstance(endpoint, str)
            assert endpoint.startswith(info["runtime_dir"])
            assert Path(endpoint).is_socket()
        out, _ = await execute(kc, "print(sum(range(10)))")
        assert out.strip() == "45"
    assert not Path(info["runtime_dir"]).exists()


async def test_cleanup_is_idempotent(
    make_kernelspec: KernelSpecFactory, host_config: dict[str, Any]
) -> None:
    async with running_kernel(make_kernelspec, host_config) as (km, _):
        provisioner = km.provisioner
    await provisioner.cleanup()
    await provisioner.cleanup(restart=False)
    assert not provisioner.has_process


async def test_second_start_uses_the_prepared_launcher(
    make_kernelspec: KernelSpecFactory, host_config: dict[str, Any], host_a: SSHDaemon
) -> None:
    """Warm starts skip the login shell: a spare launcher waits on the pooled connection."""
    async with running_kernel(make_kernelspec, host_config) as (km1, _):
        first = (await km1.provisioner.get_provisioner_info())["launcher_pid"]

        def spare_pids() -> set[int]:
            return launchers_under(host_a.process.pid) - {first}

        await wait_until(lambda: len(spare_pids()) == 1, 10, "a spare launcher")
        (spare,) = spare_pids()
        async with running_kernel(make_kernelspec, host_config) as (km2, kc2):
            assert (await km2.provisioner.get_provisioner_info())["launcher_pid"] == spare
            out, _ = await execute(kc2, "print('warm')")
            assert out.strip() == "warm"


async def test_prewarm_can_be_disabled(
    make_kernelspec: KernelSpecFactory, host_config: dict[str, Any], host_a: SSHDaemon
) -> None:
    config = {**host_config, "prewarm_launcher": False}
    async with running_kernel(make_kernelspec, config) as (km, _):
        launcher = (await km.provisioner.get_provisioner_info())["launcher_pid"]
        pool = get_engine().pool
        # spares are scheduled synchronously in launch_kernel: none scheduled, none made
        assert not pool._preparing
        assert not any(entry.spares for entries in pool._entries.values() for entry in entries)
        assert launchers_under(host_a.process.pid) == {launcher}


async def test_an_unused_spare_launcher_exits_by_itself(
    make_kernelspec: KernelSpecFactory,
    host_config: dict[str, Any],
    host_a: SSHDaemon,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A spare waits SPARE_WAIT seconds for a spec (over a link cut for good nothing
    else would end it); the next start on that connection execs a fresh launcher."""
    from ssh_provisioner import control

    monkeypatch.setattr(control, "SPARE_WAIT", 1.0)
    async with running_kernel(make_kernelspec, host_config) as (km, _):
        launcher = (await km.provisioner.get_provisioner_info())["launcher_pid"]
        mine = host_a.process.pid
        await wait_until(lambda: len(launchers_under(mine)) == 2, 10, "the spare launcher")
        await wait_until(
            lambda: launchers_under(mine) == {launcher},
            10,
            "the unused spare to exit",
        )
        async with running_kernel(make_kernelspec, host_config) as (_, kc):
            out, _ = await execute(kc, "print('fresh launcher')")
            assert out.strip() == "fresh launcher"


async def test_a_killed_launcher_leaves_no_orphans(
    make_kernelspec: KernelSpecFactory, host_config: dict[str, Any]
) -> None:
    """If the launcher dies (OOM killer, an admin), its kernel must not live on unseen."""
    async with running_kernel(make_kernelspec, host_config) as (km, _):
        info = await km.provisioner.get_provisioner_info()
        os.kill(info["launcher_pid"], signal.SIGKILL)
        status = await asyncio.wait_for(km.provisioner.wait(), 10)
        assert status == -signal.SIGKILL
        # SIGKILL is delivered asynchronously: the kernel dies moments after the reap
        await wait_until(lambda: not process_alive(info["pid"]), 5, "the kernel to die")
        assert not Path(info["runtime_dir"]).exists()


async def test_argv_templates_name_paths_on_the_host(
    make_kernelspec: KernelSpecFactory, host_config: dict[str, Any]
) -> None:
    """{resource_dir} holds the kernelspec's own files on the host; {connection_file} too."""
    wrapper = (
        "import runpy, sys\n"
        "sys.argv = ['ipykernel_launcher', *sys.argv[1:]]\n"
        "runpy.run_module('ipykernel_launcher', run_name='__main__')\n"
    )
    argv = ["python3", "{resource_dir}/wrapper.py", "-f", "{connection_file}"]
    config = {**host_config, "remote_cwd": "/tmp"}
    async with running_kernel(
        make_kernelspec, config, argv=argv, files={"wrapper.py": wrapper}
    ) as (km, kc):
        info = await km.provisioner.get_provisioner_info()
        out, _ = await execute(kc, "import sys, os; print(sys.argv[0]); print(os.getcwd())")
        script, cwd = out.split()
        assert script == "ipykernel_launcher"
        assert cwd == "/tmp"
        # no path_map: a path on the host is no path on this machine
        assert km.provisioner.resolve_path("data.csv") is None
        copied = Path(info["runtime_dir"]) / "resources" / "wrapper.py"
        assert copied.read_text() == wrapper


async def test_more_kernels_than_sshd_allows_sessions_per_connection(
    make_kernelspec: KernelSpecFactory,
    two_session_host: tuple[SSHDaemon, dict[str, Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """OpenSSH refuses a session past MaxSessions on one connection: the pool opens
    another connection, every kernel runs and every policy probe (a session too)
    answers."""
    caplog.set_level(logging.INFO)
    config = {**two_session_host[1], "policy": "least-load", "probe_ttl": 0.0}
    async with AsyncExitStack() as stack:
        kernels = [
            await stack.enter_async_context(running_kernel(make_kernelspec, config))
            for _ in range(3)
        ]
        kernels += await asyncio.gather(  # concurrent starts race for the same slots
            *(stack.enter_async_context(running_kernel(make_kernelspec, config)) for _ in range(3))
        )
        pids = {await kernel_pid(kc) for _, kc in kernels}
        assert len(pids) == 6
        assert get_engine().pool.open_connections >= 3  # 2 sessions each: 6 kernels (+ spares)
        assert "at its session limit" in caplog.text  # the limit was hit
        assert " failed: " not in caplog.text  # no probe (nor start) failed
        km, kc = kernels[-1]  # signals travel on a later connection too
        msg_id = kc.execute("import time; print('go', flush=True); time.sleep(30)")
        await wait_for_output(kc, msg_id)
        await km.interrupt_kernel()
        reply = await kc.get_shell_msg(timeout=10)
        assert reply["content"]["ename"] == "KeyboardInterrupt"
    assert not any(process_alive(pid) for pid in pids)
