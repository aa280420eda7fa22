"""Over a wide-area link (a host behind the benchmarks' userspace delay line): a kernel
does its whole life over a long, lossy link and loses nothing, and a warm start's first
clients go out on the channels their ports proved while the kernel started.

Speed is the benchmark's (benchmarks/wan.py); these judge what is done, not how fast."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.manager import AsyncKernelManager

from benchmarks.delay_line import PROFILES, wide_area_host
from ssh_provisioner.throwaway import start_sshd

from ..conftest import KernelSpecFactory, rig_config
from ..helpers import execute, interrupt_a_running_cell
from ..kit import running_kernel

pytestmark = [pytest.mark.sshd, pytest.mark.usefixtures("no_leaks")]

LINES = 300
NUMBERED = f"for i in range({LINES}):\n    print(i, 'x' * 1000, flush=True)"


@pytest.fixture(params=["wan100-loss", "wan50"])
def far_host(
    request: pytest.FixtureRequest, tmp_path: Path, client_key: tuple[Path, str]
) -> Iterator[dict[str, Any]]:
    """A provisioner config for a host behind the profile's link."""
    with wide_area_host(PROFILES[request.param]) as host:
        daemon = start_sshd(
            tmp_path / "far-host", host.address, client_key[1] + "\n", netns=host.namespace
        )
        try:
            yield rig_config(daemon, client_key[0])
        finally:
            daemon.stop()


async def test_a_kernel_lives_its_whole_life_over_a_long_link(
    make_kernelspec: KernelSpecFactory, far_host: dict[str, Any]
) -> None:
    """Output crosses whole and in order, an interrupt stops a cell, a restart comes
    back with the same ports, and the kernel is gone after shutdown (no_leaks)."""
    async with running_kernel(make_kernelspec, far_host) as (km, kc):
        out, reply = await execute(kc, NUMBERED, timeout=120)
        assert reply["status"] == "ok"
        assert [line.split()[0] for line in out.splitlines()] == [str(i) for i in range(LINES)]
        await interrupt_a_running_cell(km, kc)
        ports = km.provisioner.connection_info if km.provisioner else {}
        await km.restart_kernel()
        await kc.wait_for_ready(timeout=60)
        assert (km.provisioner.connection_info if km.provisioner else {}) == ports
        out, _ = await execute(kc, "print('after the restart')")
        assert out == "after the restart\n"


class TripLog(logging.Handler):
    """The ``ssh_provisioner.trips`` lines: (why, which), in order."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.trips: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        self.trips.append((str(args[1]), str(args[2]).strip()) if len(args) > 2 else ("", ""))


async def test_a_warm_starts_first_clients_use_the_channels_proven_meanwhile(
    make_kernelspec: KernelSpecFactory, far_host: dict[str, Any]
) -> None:
    ksm, name = make_kernelspec(far_host)
    trips = TripLog()
    logger = logging.getLogger("ssh_provisioner.trips")
    logger.addHandler(trips)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        for warm in (False, True):  # the first start warms the pool: a spare launcher
            km = AsyncKernelManager(kernel_name=name, kernel_spec_manager=ksm)
            await km.start_kernel()
            started_at = len(trips.trips)
            kc = km.client()
            kc.start_channels()
            try:
                await kc.wait_for_ready(timeout=60)
            finally:
                kc.stop_channels()
                await km.shutdown_kernel()
            after = trips.trips[started_at:]
            if warm:
                opened = {which for why, which in after if why == "stream open"}
                # shell, iopub, stdin and hb took their ports' spares; control may open
                # one more (the manager's own control connection took the spare)
                assert opened <= {"control"}, after
    finally:
        logger.removeHandler(trips)
        logger.setLevel(level)
