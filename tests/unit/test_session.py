"""The fast tier for a whole session: the real launcher (from its real payload) and a real
ipykernel run as local processes behind ``LocalLink``, an SSHLink without SSH.  The
session's state machine (STARTING -> RUNNING -> UNREACHABLE -> REATTACHING -> RUNNING
-> CLOSED), the relay's resume and the reattach through the reattach payload, in
seconds.  (Through real sshd: tests/integration/test_resilience.py.)"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from jupyter_client.asynchronous import AsyncKernelClient

from ssh_provisioner import pool as pool_module
from ssh_provisioner.hosts import Host
from ssh_provisioner.pool import ConnectionPool
from ssh_provisioner.session import KernelSession, State
from ssh_provisioner.settings import SessionSettings
from ssh_provisioner.tunnels import KernelPorts

from ..helpers import process_alive, wait_until
from ..local_link import LocalLink

KEY = secrets.token_hex(16)
LINES = 40


@pytest.fixture
async def links(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[list[LocalLink]]:
    made: list[LocalLink] = []

    async def connect(host: Host, options: dict[str, Any], *, connect_timeout: float) -> Any:
        made.append(LocalLink())
        return made[-1]

    monkeypatch.setattr(pool_module, "connect", connect)
    yield made
    for link in made:
        await link.kill_all()


def settings(kernel_id: str) -> SessionSettings:
    return SessionSettings(
        kernel_id=kernel_id,
        host_name="local",
        host=Host.parse("local"),
        connect_options={},
        python=sys.executable,
        connect_timeout=5.0,
        launch_timeout=30.0,
        reconnect_timeout=20.0,
        idle_timeout=0.0,
        ping_interval=1.0,
        prewarm=False,
    )


def launch_spec(kernel_id: str) -> dict[str, Any]:
    return {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "kernel_id": kernel_id,
        "attach_token": secrets.token_hex(16),
        "connection": {"key": KEY, "signature_scheme": "hmac-sha256", "kernel_name": "t"},
        "orphan_timeout": 30,
        "liveness_timeout": 10,
    }


def client(ports: KernelPorts) -> AsyncKernelClient:
    kc = AsyncKernelClient()
    numbers = ports.numbers
    kc.load_connection_info(
        {
            "ip": "127.0.0.1",
            "transport": "tcp",
            "key": KEY,
            "signature_scheme": "hmac-sha256",
            **{f"{channel}_port": port for channel, port in numbers.items()},
        }
    )
    return kc


@pytest.mark.asyncio
async def test_a_session_survives_a_lost_link_and_ends_with_nothing_left(
    links: list[LocalLink], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ssh_provisioner")
    kernel_id = f"fast-{secrets.token_hex(4)}"
    pool, ports = ConnectionPool(), await KernelPorts.open()
    session = KernelSession(settings(kernel_id), pool, ports)
    kc = client(ports)
    try:
        await session.start(launch_spec(kernel_id))
        assert session.state is State.RUNNING
        handshake = session.handshake
        assert handshake is not None
        kc.start_channels()
        await kc.wait_for_ready(timeout=30)

        cell = (
            f"import time\nfor i in range({LINES}):\n    print(i, flush=True)\n    time.sleep(0.05)"
        )
        msg_id = kc.execute(cell)
        printed: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            msg = await kc.get_iopub_msg(timeout=30)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                printed.append(msg["content"]["text"])
                if len(printed) == 3 and len(links) == 1:
                    links[0].cut()  # the connection is lost mid-cell
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        assert "".join(printed).split() == [str(i) for i in range(LINES)]  # none lost
        assert len(links) == 2  # reconnected on a new link, and reattached
        assert session.state is State.RUNNING
        assert session.handshake is handshake  # the same launcher and kernel
        said = caplog.text  # RUNNING -> UNREACHABLE -> REATTACHING -> RUNNING
        assert "SSH connection lost; reconnecting for up to 20s" in said
        assert "reattached after" in said
        reply = await kc.get_shell_msg(timeout=30)
        assert reply["content"]["status"] == "ok"
    finally:
        kc.stop_channels()
        await session.aclose()
        await ports.aclose()
        await pool.aclose()
    assert session.state is State.CLOSED
    assert session.poll() is not None
    await wait_until(lambda: not process_alive(handshake.pid), 10, "the kernel to end")
    await wait_until(
        lambda: all(p.process.returncode is not None for link in links for p in link.processes),
        10,
        "every launcher to end",
    )


@pytest.mark.asyncio
async def test_a_host_that_never_comes_back_is_given_up_after_reconnect_timeout(
    links: list[LocalLink], monkeypatch: pytest.MonkeyPatch
) -> None:
    """RUNNING -> UNREACHABLE -> (REATTACHING ...) -> ABANDONED: the kernel counts as dead
    (255, as ssh(1) says of a lost link); its launcher ends it as an orphan."""
    from ssh_provisioner.errors import SSHConnectError

    kernel_id = f"fast-{secrets.token_hex(4)}"
    pool, ports = ConnectionPool(), await KernelPorts.open()
    quick = dataclasses.replace(settings(kernel_id), reconnect_timeout=1.5)
    session = KernelSession(quick, pool, ports)
    try:
        await session.start(launch_spec(kernel_id))
        original = pool_module.connect

        async def unreachable(
            host: Host, options: dict[str, Any], *, connect_timeout: float
        ) -> Any:
            raise SSHConnectError(f"SSH to {host}: no route to host", host=str(host))

        monkeypatch.setattr(pool_module, "connect", unreachable)
        links[0].cut()
        assert await asyncio.wait_for(session.wait(), 15) == 255
        assert session.state is State.ABANDONED
        monkeypatch.setattr(pool_module, "connect", original)
    finally:
        await session.aclose()
        await ports.aclose()
        await pool.aclose()


@pytest.mark.asyncio
async def test_a_kernel_that_exits_reports_its_status_without_a_reconnect(
    links: list[LocalLink],
) -> None:
    kernel_id = f"fast-{secrets.token_hex(4)}"
    pool, ports = ConnectionPool(), await KernelPorts.open()
    session = KernelSession(settings(kernel_id), pool, ports)
    kc = client(ports)
    try:
        await session.start(launch_spec(kernel_id))
        kc.start_channels()
        await kc.wait_for_ready(timeout=30)
        kc.execute("import os; os._exit(3)")
        assert await asyncio.wait_for(session.wait(), 15) == 3
        assert len(links) == 1
    finally:
        kc.stop_channels()
        await session.aclose()
        await ports.aclose()
        await pool.aclose()
