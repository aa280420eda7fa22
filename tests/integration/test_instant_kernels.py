"""Instant kernels (prespawn): a kernel started ahead of time is handed to one start
that fits, with its own key; a start that does not fit starts cold; one nobody takes
is replaced; all of them end with the process's engine.  Real sshd, real ipykernels."""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.asynchronous import AsyncKernelClient
from jupyter_client.manager import AsyncKernelManager

from ssh_provisioner import prespawn
from ssh_provisioner.engine import get_engine, shutdown_engine
from ssh_provisioner.prespawn import Ready
from ssh_provisioner.status import board

from ..conftest import KernelSpecFactory, rig_config
from ..helpers import execute, process_alive, wait_until
from ..kit import cli, cli_env, kernel_pid
from ..sshd import SSHDaemon

pytestmark = [pytest.mark.sshd, pytest.mark.usefixtures("no_leaks")]


@pytest.fixture(autouse=True)
def keeping_kernels_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    """As the server extension does for Jupyter Server."""
    monkeypatch.setattr(prespawn, "_enabled", True)


@pytest.fixture
def config(host_a: SSHDaemon, client_key: tuple[Path, str]) -> dict[str, Any]:
    return rig_config(host_a, client_key[0], launch_timeout=30.0, orphan_timeout=5.0, prespawn=1)


@asynccontextmanager
async def kernel(
    ksm: Any, name: str, env: dict[str, str] | None = None
) -> AsyncIterator[tuple[AsyncKernelManager, AsyncKernelClient]]:
    km = AsyncKernelManager(kernel_name=name, kernel_spec_manager=ksm)
    await km.start_kernel(env={**os.environ, **(env or {})})  # as Jupyter Server starts one
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=30)
        yield km, kc
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)


async def one_ready(timeout: float = 60.0) -> Ready:
    def ready() -> list[Ready]:
        return get_engine().reserve.ready()

    await wait_until(lambda: len(ready()) == 1, timeout, "a pre-spawned kernel")
    return ready()[0]


def ready_pid(ready: Ready) -> int:
    session = ready.seat.session
    assert session is not None
    assert session.handshake is not None
    return session.handshake.pid


def start_kind(km: AsyncKernelManager) -> str:
    return str((board.get(km.kernel_id) or {}).get("start_kind"))


async def test_a_start_takes_the_ready_kernel_with_its_own_key(
    make_kernelspec: KernelSpecFactory, config: dict[str, Any]
) -> None:
    ksm, name = make_kernelspec(config)
    async with kernel(ksm, name) as (km1, kc1):
        assert start_kind(km1) == "cold"  # the kernelspec's first start here fills the shelf
        waiting = await one_ready()
        pid, key = ready_pid(waiting), waiting.connection["key"]
        notebook = "/home/someone/analysis.ipynb"
        async with kernel(ksm, name, {"JPY_SESSION_NAME": notebook}) as (km2, kc2):
            assert start_kind(km2) == "prespawned"
            assert await kernel_pid(kc2) == pid
            assert km2.session.key == key != km1.session.key
            out, reply = await execute(
                kc2, "import os; print(__session__, os.environ['JPY_SESSION_NAME'])"
            )
            assert reply["status"] == "ok", reply
            assert out.split() == [notebook, notebook]
            refill = await one_ready()  # the next one, spawned in the background
            assert ready_pid(refill) not in (pid, await kernel_pid(kc1))
            await km2.restart_kernel(now=True)  # a restart keeps the kernel's key
            await kc2.wait_for_ready(timeout=30)
            assert km2.session.key == key
            assert await kernel_pid(kc2) != pid
            _, reply = await execute(kc2, "pass")
            assert reply["status"] == "ok"
        assert not process_alive(pid) or pid == ready_pid(refill)


async def test_a_start_that_does_not_fit_starts_cold(
    make_kernelspec: KernelSpecFactory, config: dict[str, Any]
) -> None:
    ksm, name = make_kernelspec(config)
    async with kernel(ksm, name):
        waiting = await one_ready()
        checked = await asyncio.to_thread(cli, "check", name, "--json", env=cli_env(ksm))
        (report,) = json.loads(checked.stdout)
        kernels = report["checks"]["kernels"]["detail"]  # this login's, on the host
        assert int(re.findall(r"\((\d+) kept ready\)", kernels)[0]) >= 1, kernels
        async with kernel(ksm, name, {"KERNEL_PROJECT": "other"}) as (km, kc):
            assert start_kind(km) in ("cold", "warm")  # (warm: a spare launcher)
            out, _ = await execute(kc, "import os; print(os.environ['KERNEL_PROJECT'])")
            assert out.strip() == "other"
            assert get_engine().reserve.ready() == [waiting]  # still there for a fit


async def test_a_kernel_nobody_takes_is_replaced_and_all_end_with_the_engine(
    make_kernelspec: KernelSpecFactory, config: dict[str, Any]
) -> None:
    ksm, name = make_kernelspec({**config, "prespawn_max_idle": 2.0, "orphan_timeout": 60.0})
    async with kernel(ksm, name):
        first = await one_ready()
        first_pid = ready_pid(first)
        await wait_until(
            lambda: [r for r in get_engine().reserve.ready() if r is not first],
            30,
            "a fresh kernel in place of the one nobody took",
        )
        await wait_until(lambda: not process_alive(first_pid), 10, "the idle kernel to end")
        still_waiting = ready_pid(get_engine().reserve.ready()[0])
    # Ended by the engine's shutdown, not by its orphan clock (a minute here).
    await asyncio.to_thread(shutdown_engine)
    assert not process_alive(still_waiting)
