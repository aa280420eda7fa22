"""Kernels survive a lost SSH connection: the provisioner reconnects and reattaches to
the launcher, reopening the forwards on the same local ports."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.manager import AsyncKernelManager
from jupyter_client.provisioning import KernelProvisionerFactory

from ssh_provisioner import HostSelectionError, KernelUnreachable
from ssh_provisioner.engine import shutdown_engine
from ssh_provisioner.session import State

from ..conftest import KernelSpecFactory, rig_config
from ..helpers import execute, process_alive, wait_until
from ..kit import PROCESS_A, running_kernel, take_over
from ..leaks import launchers_under, own_listeners
from ..netns import Link
from ..sshd import SSHDaemon, start_sshd

pytestmark = [pytest.mark.sshd, pytest.mark.usefixtures("no_leaks")]


def lost(km: AsyncKernelManager) -> bool:
    return km.provisioner.seat.session.state is not State.RUNNING


def reattached(km: AsyncKernelManager, old_leases: list[Any]) -> bool:
    session = km.provisioner.seat.session
    return session.state is State.RUNNING and session._lease not in old_leases


@pytest.fixture
def flaky_host(tmp_path: Path, client_key: tuple[Path, str]) -> Iterator[SSHDaemon]:
    daemon = start_sshd(tmp_path / "flaky", "127.0.0.9", client_key[1] + "\n")
    yield daemon
    daemon.stop()


@pytest.fixture
def flaky_config(flaky_host: SSHDaemon, client_key: tuple[Path, str]) -> dict[str, Any]:
    return rig_config(flaky_host, client_key[0], orphan_timeout=60.0, reconnect_timeout=30.0)


async def test_a_running_cell_survives_an_sshd_restart(
    make_kernelspec: KernelSpecFactory, flaky_config: dict[str, Any], flaky_host: SSHDaemon
) -> None:
    async with running_kernel(make_kernelspec, flaky_config) as (km, kc):
        await execute(kc, "x = 42")
        ports = dict(km.get_connection_info())
        pid = (await km.provisioner.get_provisioner_info())["pid"]
        msg_id = kc.execute("import time; time.sleep(3); print(x + 1)")
        while not (  # the kernel has the request (in-flight messages die with a link)
            (message := await kc.get_iopub_msg(timeout=10))["msg_type"] == "status"
            and message["parent_header"].get("msg_id") == msg_id
        ):
            pass
        flaky_host.stop()  # every connection of the host dies with its sshd
        await wait_until(lambda: lost(km), 10, "the lost connection")
        assert await km.provisioner.poll() is None  # unreachable, not dead
        assert process_alive(pid)
        flaky_host.start()
        deadline = time.monotonic() + 30
        printed = ""
        while True:  # the cell's output arrives once reattached
            message = await kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
            if message["parent_header"].get("msg_id") != msg_id:
                continue
            if message["msg_type"] == "stream":
                printed += message["content"]["text"]
            if message["msg_type"] == "status" and message["content"]["execution_state"] == "idle":
                break
        assert printed == "43\n"
        assert dict(km.get_connection_info()) == ports  # same local ports
        out, _ = await execute(kc, "print(x)")
        assert out.strip() == "42"
        assert (await km.provisioner.get_provisioner_info())["pid"] == pid


async def test_an_unreachable_kernel_counts_as_dead_then_is_reaped(
    make_kernelspec: KernelSpecFactory, flaky_config: dict[str, Any], flaky_host: SSHDaemon
) -> None:
    config = {**flaky_config, "reconnect_timeout": 1.5, "orphan_timeout": 2.0}
    async with running_kernel(make_kernelspec, config) as (km, _):
        pid = (await km.provisioner.get_provisioner_info())["pid"]
        flaky_host.stop()
        started = time.monotonic()
        status = await asyncio.wait_for(km.provisioner.wait(), 20)
        assert status == 255
        assert time.monotonic() - started >= 1.0  # it tried to reconnect first
        # the launcher kills its orphan after orphan_timeout: nothing is left on the host
        await wait_until(lambda: not process_alive(pid), 15, "the orphaned kernel to be killed")


@pytest.mark.parametrize("encryption", ["disabled", "required"])
async def test_reattach_from_another_process(
    make_kernelspec: KernelSpecFactory,
    flaky_config: dict[str, Any],
    tmp_path: Path,
    encryption: str,
) -> None:
    ksm, name = make_kernelspec(flaky_config, metadata={"supported_encryption": ["curve"]})
    saved = tmp_path / "provisioner-info.json"
    kernel_dirs = ksm.kernel_dirs[0]
    subprocess.run(
        [sys.executable, "-c", PROCESS_A, kernel_dirs, name, str(saved), encryption],
        check=True, timeout=120,
    )  # fmt: skip
    info = json.loads(saved.read_text())
    assert process_alive(info["pid"])  # orphaned, waiting to be reattached
    assert ("curve_publickey" in info["connection_info"]) == (encryption == "required")

    # A provisioner whose hosts do not include the kernel's host may not take it over.
    other_ksm, other_name = make_kernelspec({**flaky_config, "hosts": ["root@127.0.0.250:22"]})
    stranger = AsyncKernelManager(kernel_name=other_name, kernel_spec_manager=other_ksm)
    provisioner = KernelProvisionerFactory.instance().create_provisioner_instance(
        info["kernel_id"], stranger.kernel_spec, parent=stranger
    )
    with pytest.raises(HostSelectionError, match=r"not one of the configured hosts"):
        await provisioner.load_provisioner_info(info)
    assert process_alive(info["pid"])

    km = await take_over(ksm, name, info, transport_encryption=encryption)
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=30)
        out, _ = await execute(kc, "print(secret)")
        assert out.strip() == "kept across processes"
        assert km.provisioner.connection_info["shell_port"] == info["local_ports"]["shell"]
        public = info["connection_info"].get("curve_publickey")
        assert km.curve_publickey == (public.encode() if public else None)
    finally:
        kc.stop_channels()
        await km.shutdown_kernel()
    assert not process_alive(info["pid"])
    assert not Path(info["runtime_dir"]).exists()


async def test_a_cell_survives_a_cut_link(
    make_kernelspec: KernelSpecFactory, host_behind_a_link: tuple[Link, dict[str, Any]]
) -> None:
    """The link to the host is down for about 10 s while a cell runs (no FIN, no RST:
    only keepalives notice); the cell's output arrives once it is back."""
    link, config = host_behind_a_link
    config = {**config, "connect_timeout": 2.0, "orphan_timeout": 60.0, "reconnect_timeout": 60.0}
    async with running_kernel(make_kernelspec, config) as (km, kc):
        await execute(kc, "x = 'survived'")
        code = "import time; print('start', flush=True); time.sleep(20); print(x)"
        msg_id = kc.execute(code)
        while not (
            (m := await kc.get_iopub_msg(timeout=10))["msg_type"] == "stream"
            and m["parent_header"].get("msg_id") == msg_id
        ):
            pass
        link.down()
        cut = time.monotonic()
        lease = km.provisioner.seat.session._lease
        await wait_until(lambda: lease.connection.is_closed(), 15, "keepalives to notice")
        assert await km.provisioner.poll() is None  # unreachable, not dead
        await asyncio.sleep(max(0.0, cut + 10 - time.monotonic()))  # the outage itself
        link.up()
        printed = ""
        deadline = time.monotonic() + 40
        while "survived" not in printed:
            m = await kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
            if m["msg_type"] == "stream" and m["parent_header"].get("msg_id") == msg_id:
                printed += m["content"]["text"]
        out, _ = await execute(kc, "print(x)")
        assert out.strip() == "survived"


async def test_more_kernels_than_max_sessions_reattach_after_an_sshd_restart(
    make_kernelspec: KernelSpecFactory, two_session_host: tuple[SSHDaemon, dict[str, Any]]
) -> None:
    """After a restart each kernel needs a new session to reattach; past MaxSessions
    they spread over more connections instead of waiting out reconnect_timeout."""
    daemon, config = two_session_host
    config = {**config, "orphan_timeout": 60.0, "reconnect_timeout": 30.0}
    async with AsyncExitStack() as stack:
        kernels = [
            await stack.enter_async_context(running_kernel(make_kernelspec, config))
            for _ in range(3)
        ]
        for index, (_, kc) in enumerate(kernels):
            await execute(kc, f"x = {index}")
        leases = [km.provisioner.seat.session._lease for km, _ in kernels]
        daemon.stop()
        for lease in leases:
            await wait_until(lambda lease=lease: lease.connection.is_closed(), 10, "loss")
        daemon.start()
        started = time.monotonic()
        for index, (km, kc) in enumerate(kernels):
            await wait_until(lambda km=km: reattached(km, leases), 20, "the reattach")
            out, _ = await execute(kc, "print(x)")
            assert out.strip() == str(index)
        assert time.monotonic() - started < 20  # none waited for reconnect_timeout


async def test_a_link_down_for_good_leaves_nothing_on_the_host(
    make_kernelspec: KernelSpecFactory, host_behind_a_link: tuple[Link, dict[str, Any]]
) -> None:
    """The link goes down and stays down (a laptop that left): no FIN reaches the host,
    whose sshd keeps the session for hours. The kernel is reported dead here after
    reconnect_timeout; there, its launcher hears no ping, counts the client as gone and
    kills the kernel after orphan_timeout."""
    link, config = host_behind_a_link
    config = {
        **config,
        "keepalive_count_max": 2,
        "connect_timeout": 1.0,
        "reconnect_timeout": 2.0,
        "orphan_timeout": 1.0,
    }
    async with running_kernel(make_kernelspec, config) as (km, _):
        info = await km.provisioner.get_provisioner_info()
        link.down()
        cut = time.monotonic()
        assert await asyncio.wait_for(km.provisioner.wait(), 30) == 255
        # silence (3 keepalive intervals) + orphan_timeout + the kill: a few seconds
        await wait_until(lambda: not process_alive(info["pid"]), 20, "the kernel to go")
        await wait_until(
            lambda: not Path(info["runtime_dir"]).exists(), 10, "its runtime dir to go"
        )
        assert time.monotonic() - cut < 20


FAKE_LAUNCHER = """
import json, os, socket, sys
path = sys.argv[1]
os.makedirs(os.path.dirname(path), exist_ok=True)
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(path)
server.listen(1)
print("listening", flush=True)
server.settimeout(60)
conn, _ = server.accept()
conn.settimeout(5)
received = b""
conn.sendall(b'{"challenge": "00", "proof": "not a proof"}\\n')
try:
    while True:
        data = conn.recv(65536)
        if not data:
            break
        received += data
        conn.sendall(b'{"event": "attached"}\\n')
except OSError:
    pass
print(received.hex(), flush=True)
"""


async def test_a_fake_launcher_gets_neither_the_token_nor_the_code(
    make_kernelspec: KernelSpecFactory,
    flaky_config: dict[str, Any],
    flaky_host: SSHDaemon,
    test_user: str,
) -> None:
    """The kernel dies while its client is cut off; another user on the host takes its
    control socket's path.  The reconnecting provisioner learns the impostor cannot
    prove it knows the token, sends it nothing it could use, and counts the kernel dead."""
    async with running_kernel(make_kernelspec, flaky_config) as (km, _):
        info = await km.provisioner.get_provisioner_info()
        flaky_host.stop()
        await wait_until(lambda: lost(km), 10, "the lost connection")
        for pid in (info["launcher_pid"], info["pid"]):  # the kernel dies meanwhile
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await wait_until(lambda: not process_alive(info["pid"]), 10, "the kernel to die")
        shutil.rmtree(info["runtime_dir"], ignore_errors=True)
        control = info["handshake"]["control"]
        impostor = await asyncio.create_subprocess_exec(
            "runuser", "-u", test_user, "--", sys.executable, "-c", FAKE_LAUNCHER, control,
            stdout=subprocess.PIPE,
        )  # fmt: skip
        try:
            assert impostor.stdout is not None
            assert await impostor.stdout.readline() == b"listening\n"
            flaky_host.start()
            assert await asyncio.wait_for(km.provisioner.wait(), 30) == 255
            received = bytes.fromhex((await impostor.stdout.readline()).decode().strip())
            assert await asyncio.wait_for(impostor.wait(), 30) == 0
        finally:
            if impostor.returncode is None:
                impostor.kill()
                await impostor.wait()
            shutil.rmtree(Path(control).parent, ignore_errors=True)
        assert received.startswith(b'{"hello": "')  # a nonce, and nothing after it
        assert received.count(b"\n") == 1
        assert info["attach_token"].encode() not in received


async def test_an_abandoned_kernel_is_ended_once_its_host_is_back(
    make_kernelspec: KernelSpecFactory, flaky_config: dict[str, Any], flaky_host: SSHDaemon
) -> None:
    """Past reconnect_timeout the kernel counts as dead (a restarter would start a new
    one); when the host is back, shutting the old one down ends it there at once, not
    orphan_timeout (here 10 min) later."""
    config = {**flaky_config, "reconnect_timeout": 1.5, "orphan_timeout": 600.0}
    async with running_kernel(make_kernelspec, config) as (km, _):
        pid = (await km.provisioner.get_provisioner_info())["pid"]
        flaky_host.stop()
        assert await asyncio.wait_for(km.provisioner.wait(), 20) == 255
        assert process_alive(pid)  # abandoned, still running on the host
        flaky_host.start()
        await km.shutdown_kernel(now=True)
        await wait_until(lambda: not process_alive(pid), 10, "the abandoned kernel to end")


async def test_interrupt_and_shutdown_during_an_outage(
    make_kernelspec: KernelSpecFactory, flaky_config: dict[str, Any], flaky_host: SSHDaemon
) -> None:
    """During a cut an interrupt is refused with a clear error (nothing queued), and a
    shutdown finishes without a transport error; the kernel, abandoned, is ended by the
    next connection to its host."""
    config = {**flaky_config, "orphan_timeout": 600.0}
    async with running_kernel(make_kernelspec, config) as (km, _):
        pid = (await km.provisioner.get_provisioner_info())["pid"]
        flaky_host.stop()
        await wait_until(lambda: lost(km), 10, "the lost connection")
        with pytest.raises(KernelUnreachable, match=r"unreachable .*not delivered"):
            await km.interrupt_kernel()
        await km.shutdown_kernel(now=True)
        assert process_alive(pid)  # nobody could reach it yet
    flaky_host.start()
    async with running_kernel(make_kernelspec, config) as (_, kc):  # a new connection
        await wait_until(lambda: not process_alive(pid), 10, "the abandoned kernel to end")
        out, _ = await execute(kc, "print('fresh')")
        assert out.strip() == "fresh"


SQUATTER = """
import socket, sys
for port in map(int, sys.argv[1:]):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
        print("bound", port, flush=True)
        sys.exit(1)
print("refused", flush=True)
"""


async def test_local_ports_stay_ours_and_a_request_sent_in_the_outage_is_answered(
    make_kernelspec: KernelSpecFactory,
    flaky_config: dict[str, Any],
    flaky_host: SSHDaemon,
    test_user: str,
) -> None:
    """While the host is unreachable the kernel's local ports stay bound (another user
    cannot take them and receive the next cell's code), and a client's connections are
    held, not refused: a cell sent during the outage runs when the host is back, and its
    output and reply arrive without any nudge, as does the next cell's."""
    async with running_kernel(make_kernelspec, flaky_config) as (km, kc):
        await execute(kc, "x = 41")
        info = dict(km.get_connection_info())
        ports = [
            info[f"{channel}_port"] for channel in ("shell", "iopub", "stdin", "control", "hb")
        ]
        flaky_host.stop()
        await wait_until(lambda: lost(km), 10, "the lost connection")
        squatter = subprocess.run(
            ["runuser", "-u", test_user, "--", sys.executable, "-c", SQUATTER, *map(str, ports)],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert squatter.stdout.strip() == "refused", squatter.stdout + squatter.stderr
        msg_id = kc.execute("print('sent in the outage', x + 1)")
        flaky_host.start()
        printed, state = "", ""
        deadline = time.monotonic() + 30
        while state != "idle":
            message = await kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
            if message["parent_header"].get("msg_id") != msg_id:
                continue
            if message["msg_type"] == "stream":
                printed += message["content"]["text"]
            if message["msg_type"] == "status":
                state = message["content"]["execution_state"]
        assert printed == "sent in the outage 42\n"
        reply = await kc.get_shell_msg(timeout=10)
        assert reply["parent_header"]["msg_id"] == msg_id
        assert reply["content"]["status"] == "ok"
        assert dict(km.get_connection_info()) == info
        out, _ = await execute(kc, "print('after', x)")
        assert out.strip() == "after 41"


async def test_a_cancelled_start_leaves_nothing_here_or_there(
    make_kernelspec: KernelSpecFactory, flaky_config: dict[str, Any], flaky_host: SSHDaemon
) -> None:
    """A start cancelled while the launcher runs on the host (a browser tab closed, a
    server stopping) leaves no kernel, launcher, local port or leased connection."""
    from ssh_provisioner.engine import get_engine

    ksm, name = make_kernelspec({**flaky_config, "pool_idle_timeout": 0})
    km = AsyncKernelManager(kernel_name=name, kernel_spec_manager=ksm)
    before = own_listeners()
    start = asyncio.ensure_future(km.start_kernel())
    mine = flaky_host.process.pid
    await wait_until(lambda: bool(launchers_under(mine)), 30, "the launcher")
    start.cancel()
    with pytest.raises(asyncio.CancelledError):
        await start
    await km.cleanup_resources()
    pool = get_engine().pool
    await wait_until(lambda: pool.open_connections == 0, 10, "the connection to close")
    await wait_until(lambda: not launchers_under(mine), 10, "the launcher to go")
    assert own_listeners() <= before


async def test_closing_the_engine_during_a_reconnect_is_quiet(
    make_kernelspec: KernelSpecFactory,
    host_behind_a_link: tuple[Link, dict[str, Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The server exits (the engine closes, as at interpreter exit) while a kernel's
    connection is being re-made: no traceback, nothing left open here; the launcher,
    alone, ends its kernel after orphan_timeout."""
    caplog.set_level(logging.DEBUG)
    link, config = host_behind_a_link
    settings = {**config, "connect_timeout": 10.0, "reconnect_timeout": 60.0, "orphan_timeout": 1.0}
    ksm, name = make_kernelspec(settings)
    km = AsyncKernelManager(kernel_name=name, kernel_spec_manager=ksm)
    await km.start_kernel()
    session = km.provisioner.seat.session
    # The host's end goes down, this end stays up: a new connection hangs in its SYNs.
    peer = ["ip", "-n", link.namespace, "link", "set", link.veth + "p"]
    subprocess.run([*peer, "down"], check=True, timeout=30)
    try:
        await wait_until(lambda: session.state is State.REATTACHING, 20, "a reconnect under way")
        await asyncio.to_thread(shutdown_engine)
    finally:
        subprocess.run([*peer, "up"], check=True, timeout=30)
    assert "KeyError" not in caplog.text
    assert not [r for r in caplog.records if r.exc_info and r.levelno >= logging.ERROR]
    # the engine has closed the kernel's local ports; what the manager holds itself:
    km.cleanup_connection_file()
    km._close_control_socket()
    km.context.destroy(linger=0)
