"""Ports a remote kernel opens (a dashboard) reach this machine: the same number when it
is free here, another when not (and the cell says which), gone when the server in the
cell stops or the kernel ends, alive across a cut link.  The host is a network namespace
of its own, so that its ports and ours are different ports, as with a real host."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.asynchronous import AsyncKernelClient
from jupyter_client.manager import AsyncKernelManager

from ssh_provisioner.errors import ProvisionerConfigError
from ssh_provisioner.host.ports import listening_sockets
from ssh_provisioner.host.process import socket_inodes

from ..conftest import KernelSpecFactory
from ..helpers import execute, start_failing, wait_until
from ..kit import (
    DASHBOARD_CELL,
    PROCESS_A,
    STOP_DASHBOARD,
    resilient,
    running_kernel,
    take_over,
    unclaimed_port,
)
from ..netns import Link

pytestmark = [pytest.mark.sshd, pytest.mark.usefixtures("no_leaks")]


async def serve(kc: AsyncKernelClient, port: int = 0, bind: str = "127.0.0.1", big: int = 0) -> int:
    """Start a server in the kernel; its port on the host."""
    out, reply = await execute(kc, DASHBOARD_CELL.format(port=port, bind=bind, big=big))
    assert reply["status"] == "ok", reply
    return int(out)


async def forwarded(km: AsyncKernelManager) -> dict[int, int]:
    info = await km.provisioner.get_provisioner_info()
    return {int(port): local for port, local in info.get("forwarded_ports", {}).items()}


async def forward_of(km: AsyncKernelManager, port: int, timeout: float = 10) -> int:
    """The local port of the host's ``port``, once it is forwarded."""
    deadline = time.monotonic() + timeout
    while port not in (table := await forwarded(km)):
        if time.monotonic() > deadline:
            raise AssertionError(f"port {port} not forwarded after {timeout}s: {table}")
        await asyncio.sleep(0.05)
    return table[port]


async def notice(kc: AsyncKernelClient, port: int, timeout: float = 10) -> str:
    """The line the cell's output got for the host's ``port``."""
    deadline = time.monotonic() + timeout
    while True:
        message = await kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        text = message["content"].get("text", "") if message["msg_type"] == "stream" else ""
        if f"[ssh-provisioner] port {port} on" in text:
            return str(text)


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 (http://127.0.0.1)
        return bytes(response.read())


def refused(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


async def test_a_port_opened_in_a_cell_is_forwarded_under_its_own_number(
    make_kernelspec: KernelSpecFactory, host_behind_a_link: tuple[Link, dict[str, Any]]
) -> None:
    _, config = host_behind_a_link
    wanted = unclaimed_port()  # free here too: the forward takes the same number
    async with running_kernel(make_kernelspec, config) as (km, kc):
        port = await serve(kc, port=wanted)
        assert port == wanted
        assert await forward_of(km, port) == port
        # only it: what the kernel listened on once up (ipykernel's IOPub pipe) is not
        # forwarded; it would have been reported by now
        assert await forwarded(km) == {port: port}
        text = await notice(kc, port)
        assert f"is now at http://127.0.0.1:{port}" in text
        assert "taken" not in text
        body = await asyncio.to_thread(fetch, f"http://127.0.0.1:{port}/index.html")
        assert body == b"served on the host"
        # the forward listens where forward_bind says, and nowhere else
        assert ("127.0.0.1", port) in listeners_of_this_process()
        assert not any(p == port and a != "127.0.0.1" for a, p in listeners_of_this_process())

        await execute(kc, STOP_DASHBOARD)  # the server in the cell stops: so does its forward
        deadline = time.monotonic() + 10
        while port in await forwarded(km):
            assert time.monotonic() < deadline, "the forward outlived the server"
            await asyncio.sleep(0.05)
        assert refused(port)

        # a server on port 0: whatever number it gets
        port = await serve(kc)
        local = await forward_of(km, port)
        body = await asyncio.to_thread(fetch, f"http://127.0.0.1:{local}/index.html")
        assert body == b"served on the host"
    assert refused(local)  # gone with the kernel


async def test_a_port_taken_here_is_forwarded_under_another_and_the_cell_says_so(
    make_kernelspec: KernelSpecFactory, host_behind_a_link: tuple[Link, dict[str, Any]]
) -> None:
    _, config = host_behind_a_link
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        busy = taken.getsockname()[1]
        async with running_kernel(make_kernelspec, config) as (km, kc):
            port = await serve(kc, port=busy, bind="0.0.0.0")
            local = await forward_of(km, port)
            assert local != busy
            text = await notice(kc, port)
            assert f"is now at http://127.0.0.1:{local} ({busy} is taken on this machine)" in text
            body = await asyncio.to_thread(fetch, f"http://127.0.0.1:{local}/index.html")
            assert body == b"served on the host"
            await execute(kc, STOP_DASHBOARD)


async def test_forward_ports_lists_what_may_be_forwarded(
    make_kernelspec: KernelSpecFactory, host_behind_a_link: tuple[Link, dict[str, Any]]
) -> None:
    _, config = host_behind_a_link
    allowed = unclaimed_port()
    spec = {**config, "forward_ports": [f"{allowed}-{allowed}"]}
    async with running_kernel(make_kernelspec, spec) as (km, kc):
        other = await serve(kc, port=0)  # (the ephemeral range: never `allowed`)
        await execute(kc, "first = (server, site)")
        await serve(kc, port=allowed)
        assert await forward_of(km, allowed) == allowed
        # reported in the same scan as `allowed`, or before it: never forwarded
        assert other not in await forwarded(km)
        await execute(kc, STOP_DASHBOARD + "; server, site = first; " + STOP_DASHBOARD)


async def test_a_page_fetched_across_a_cut_link_completes(
    make_kernelspec: KernelSpecFactory, host_behind_a_link: tuple[Link, dict[str, Any]]
) -> None:
    link, config = host_behind_a_link
    size = 48 * 1024 * 1024  # far more than the link's buffers hold: it spans the cut
    async with running_kernel(make_kernelspec, resilient(config)) as (km, kc):
        port = await serve(kc, big=size)
        local = await forward_of(km, port)
        digest = (
            "import hashlib; print(hashlib.sha256(open(site + '/big', 'rb').read()).hexdigest())"
        )
        expected, _ = await execute(kc, digest)
        started, cut = threading.Event(), threading.Event()
        result: dict[str, Any] = {}

        def download() -> None:
            digest = hashlib.sha256()
            url = f"http://127.0.0.1:{local}/big"
            with urllib.request.urlopen(url, timeout=60) as response:
                first = response.read(256 * 1024)
                digest.update(first)
                received = len(first)
                started.set()
                cut.wait(30)  # the rest is read from the cut on
                while chunk := response.read(256 * 1024):
                    digest.update(chunk)
                    received += len(chunk)
            result["digest"], result["size"] = digest.hexdigest(), received

        fetching = asyncio.ensure_future(asyncio.to_thread(download))
        assert await asyncio.to_thread(started.wait, 30)
        lease = km.provisioner.seat.session._lease
        link.down()
        cut_at = time.monotonic()
        cut.set()
        await wait_until(lambda: lease.connection.is_closed(), 15, "keepalives to notice the cut")
        assert not fetching.done()  # the page is still on its way
        await asyncio.sleep(max(0.0, cut_at + 10.0 - time.monotonic()))  # the outage itself
        link.up()
        await asyncio.wait_for(fetching, 90)
        assert result["size"] == size  # all of it (http.client says nothing when cut short)
        assert result["digest"] == expected.strip()
        await execute(kc, STOP_DASHBOARD)


async def test_a_server_that_takes_a_kernel_over_forwards_its_ports_again(
    make_kernelspec: KernelSpecFactory,
    host_behind_a_link: tuple[Link, dict[str, Any]],
    tmp_path: Path,
) -> None:
    """A server gone without a shutdown (its forwards with it), and the next one that
    reattaches to its kernel: the launcher reports the kernel's ports again."""
    _, config = host_behind_a_link
    ksm, name = make_kernelspec(resilient(config))
    saved = tmp_path / "provisioner-info.json"
    cell = DASHBOARD_CELL.format(bind="127.0.0.1", port=0, big=0)
    subprocess.run(
        [sys.executable, "-c", PROCESS_A, ksm.kernel_dirs[0], name, str(saved), "disabled", cell],
        check=True, timeout=120,
    )  # fmt: skip
    info = json.loads(saved.read_text())
    km = await take_over(ksm, name, info)
    try:
        [(_, local)] = (await forward_of_any(km)).items()
        body = await asyncio.to_thread(fetch, f"http://127.0.0.1:{local}/index.html")
        assert body == b"served on the host"
    finally:
        await km.shutdown_kernel()
    assert refused(local)


async def forward_of_any(km: AsyncKernelManager, timeout: float = 10) -> dict[int, int]:
    deadline = time.monotonic() + timeout
    while not (table := await forwarded(km)):
        assert time.monotonic() < deadline, "no port forwarded again"
        await asyncio.sleep(0.05)
    return table


async def test_a_forward_ports_typo_is_refused_before_anything_starts(
    make_kernelspec: KernelSpecFactory, host_config: dict[str, Any]
) -> None:
    message = await start_failing(
        make_kernelspec, {**host_config, "forward_ports": [6006, "80-x"]}, ProvisionerConfigError
    )
    assert "forward_ports: '80-x' is not a port" in message


def listeners_of_this_process() -> set[tuple[str, int]]:
    """(address, port) of the TCP listeners this process holds."""
    sockets = listening_sockets()
    return {sockets[inode] for inode in socket_inodes([os.getpid()]) if inode in sockets}
