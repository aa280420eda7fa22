"""Many hosts: policies, pinning, limits, failover and concurrency, on three real sshd
hosts that each know their own name (see the ``trio`` fixture)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.asynchronous import AsyncKernelClient
from jupyter_client.manager import AsyncKernelManager

from ssh_provisioner import HostSelectionError
from ssh_provisioner.engine import get_engine
from ssh_provisioner.hosts import HostEntry

from ..conftest import KernelSpecFactory
from ..helpers import execute, start_failing
from ..sshd import SSHDaemon, start_sshd

pytestmark = [pytest.mark.sshd, pytest.mark.usefixtures("no_leaks")]


@asynccontextmanager
async def kernel_on(
    make_kernelspec: KernelSpecFactory, config: dict[str, Any], env: dict[str, str] | None = None
) -> AsyncIterator[tuple[AsyncKernelManager, AsyncKernelClient, str]]:
    """A running kernel and the name of the host it landed on (the host's own hostname)."""
    ksm, name = make_kernelspec(config)
    km = AsyncKernelManager(kernel_name=name, kernel_spec_manager=ksm)
    await km.start_kernel(env=env or {})
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        out, _ = await execute(kc, "import socket; print(socket.gethostname())")
        yield km, kc, out.strip()
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)


async def hostnames_of(
    stack: AsyncExitStack, make_kernelspec: KernelSpecFactory, config: dict[str, Any], count: int
) -> list[str]:
    names = []
    for _ in range(count):
        _, _, hostname = await stack.enter_async_context(kernel_on(make_kernelspec, config))
        names.append(hostname)
    return names


async def test_each_host_has_its_own_identity(
    make_kernelspec: KernelSpecFactory, trio_config: dict[str, Any]
) -> None:
    async with AsyncExitStack() as stack:
        config = {**trio_config, "policy": "round-robin"}
        assert await hostnames_of(stack, make_kernelspec, config, 3) == [
            "host-a",
            "host-b",
            "host-c",
        ]
    assert get_engine().pool.open_connections == 3  # one shared connection per host


async def test_least_kernels_fills_the_emptiest_host(
    make_kernelspec: KernelSpecFactory, trio_config: dict[str, Any]
) -> None:
    async with AsyncExitStack() as stack:
        pinned = {**trio_config, "policy": "least-kernels"}
        a = {"KERNEL_SSH_HOST": trio_config["hosts"][0]}
        b = {"KERNEL_SSH_HOST": "127.0.0.4"}  # a bare host name matches too
        for env in (a, a, b):
            await stack.enter_async_context(kernel_on(make_kernelspec, pinned, env))
        _, _, hostname = await stack.enter_async_context(kernel_on(make_kernelspec, pinned))
        assert hostname == "host-c"
        _, _, hostname = await stack.enter_async_context(kernel_on(make_kernelspec, pinned))
        assert hostname == "host-b"  # b and c have 1 each: list order breaks the tie


async def test_least_load_reads_each_hosts_load(
    make_kernelspec: KernelSpecFactory, trio_config: dict[str, Any]
) -> None:
    config = {**trio_config, "policy": "least-load"}
    async with kernel_on(make_kernelspec, config) as (_, kc, hostname):
        assert hostname == "host-a"  # loads: a 0.5, b 3.0, c 1.5 (per CPU: same order)
        out, _ = await execute(kc, "print(open('/proc/loadavg').read().split()[0])")
        assert out.strip() == "0.50"


async def test_most_free_gpu_memory_picks_the_gpu_and_says_which(
    make_kernelspec: KernelSpecFactory, trio_config: dict[str, Any]
) -> None:
    config = {**trio_config, "policy": "most-free-gpu-memory"}
    async with kernel_on(make_kernelspec, config) as (_, kc, hostname):
        assert hostname == "host-c"  # its GPU 1 has 12000 MiB free
        out, _ = await execute(kc, "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])")
        assert out.strip() == "1"


async def test_gpu_policy_excludes_hosts_without_gpus(
    make_kernelspec: KernelSpecFactory, trio_config: dict[str, Any]
) -> None:
    config = {**trio_config, "policy": "most-free-gpu-memory", "hosts": trio_config["hosts"][:1]}
    message = await start_failing(make_kernelspec, config, HostSelectionError)
    assert "ruled out by policy most-free-gpu-memory" in message


async def test_first_available_prefers_list_order(
    make_kernelspec: KernelSpecFactory, trio_config: dict[str, Any]
) -> None:
    config = {**trio_config, "policy": "first-available", "hosts": trio_config["hosts"][::-1]}
    async with AsyncExitStack() as stack:
        assert await hostnames_of(stack, make_kernelspec, config, 2) == ["host-c", "host-c"]


async def test_random_places_on_configured_hosts(
    make_kernelspec: KernelSpecFactory, trio_config: dict[str, Any]
) -> None:
    config = {**trio_config, "policy": "random"}
    async with kernel_on(make_kernelspec, config) as (_, _, hostname):
        assert hostname in {"host-a", "host-b", "host-c"}


async def test_pinning_and_labels(
    make_kernelspec: KernelSpecFactory, trio_config: dict[str, Any]
) -> None:
    hosts = trio_config["hosts"]
    config = {
        **trio_config,
        "hosts": [hosts[0], {"host": hosts[1], "labels": ["a100"]}, {"host": hosts[2]}],
    }
    pin = {"KERNEL_SSH_HOST": hosts[2]}
    async with kernel_on(make_kernelspec, config, pin) as (_, _, hostname):
        assert hostname == "host-c"
    async with kernel_on(make_kernelspec, config, {"KERNEL_SSH_LABELS": "a100"}) as (_, _, name):
        assert name == "host-b"
    for env, problem in (
        ({"KERNEL_SSH_HOST": "root@evil.example:22"}, "is not one of the configured hosts"),
        ({"KERNEL_SSH_LABELS": "h100"}, "no host has the labels"),
    ):
        message = await start_failing(make_kernelspec, config, HostSelectionError, env=env)
        assert problem in message


async def test_allow_any_host_lets_a_request_name_a_host(
    make_kernelspec: KernelSpecFactory, trio_config: dict[str, Any]
) -> None:
    config = {**trio_config, "hosts": trio_config["hosts"][:1], "allow_any_host": True}
    pin = {"KERNEL_SSH_HOST": trio_config["hosts"][2]}
    async with kernel_on(make_kernelspec, config, pin) as (_, _, hostname):
        assert hostname == "host-c"


async def test_max_kernels(make_kernelspec: KernelSpecFactory, trio_config: dict[str, Any]) -> None:
    hosts = trio_config["hosts"]
    config = {
        **trio_config,
        "policy": "first-available",
        "hosts": [{"host": hosts[0], "max_kernels": 1}, hosts[1]],
        "max_kernels": 2,  # provisioner-wide default; the entry's own 1 wins on host-a
    }
    async with AsyncExitStack() as stack:
        names = await hostnames_of(stack, make_kernelspec, config, 3)
        assert names == ["host-a", "host-b", "host-b"]
        message = await start_failing(make_kernelspec, config, HostSelectionError)
        assert f"{hosts[0]}: skipped, full (1 kernels" in message
        assert f"{hosts[1]}: skipped, full (2 kernels" in message
    # shut down, every slot is free again: the next start takes host-a
    assert [get_engine().placement.kernels(HostEntry.parse(h)) for h in hosts[:2]] == [0, 0]
    async with kernel_on(make_kernelspec, config) as (_, _, hostname):
        assert hostname == "host-a"


async def test_restart_stays_on_its_host(
    make_kernelspec: KernelSpecFactory, trio_config: dict[str, Any]
) -> None:
    config = {**trio_config, "policy": "round-robin"}
    async with kernel_on(make_kernelspec, config) as (km, kc, hostname):
        for _ in range(2):
            await km.restart_kernel(now=True)
            await kc.wait_for_ready(timeout=60)
            out, _ = await execute(kc, "import socket; print(socket.gethostname())")
            assert out.strip() == hostname


async def test_third_party_policy_from_an_entry_point(
    make_kernelspec: KernelSpecFactory,
    trio_config: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    package = tmp_path / "site"
    package.mkdir()
    (package / "sshp_last_host.py").write_text(
        "from ssh_provisioner.policies import HostPolicy, Placement\n"
        "class LastHost(HostPolicy):\n"
        "    name = 'last-host'\n"
        "    def rank(self, candidates, view):\n"
        "        return [Placement(entry) for entry in reversed(candidates)]\n"
    )
    dist = package / "sshp_last_host-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sshp-last-host\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[ssh_provisioner.policies]\nlast-host = sshp_last_host:LastHost\n"
    )
    monkeypatch.syspath_prepend(str(package))
    config = {**trio_config, "policy": "last-host"}
    async with kernel_on(make_kernelspec, config) as (_, _, hostname):
        assert hostname == "host-c"
    dotted = {**trio_config, "policy": "sshp_last_host:LastHost"}
    async with kernel_on(make_kernelspec, dotted) as (_, _, hostname):
        assert hostname == "host-c"


@pytest.mark.parametrize("policy", ["round-robin", "least-kernels"])
async def test_concurrent_starts_spread_evenly(
    make_kernelspec: KernelSpecFactory, trio_config: dict[str, Any], policy: str
) -> None:
    config = {**trio_config, "policy": policy}
    async with AsyncExitStack() as stack:
        starts = [stack.enter_async_context(kernel_on(make_kernelspec, config)) for _ in range(24)]
        kernels = await asyncio.gather(*starts)
        assert Counter(hostname for _, _, hostname in kernels) == {
            "host-a": 8,
            "host-b": 8,
            "host-c": 8,
        }
        assert get_engine().pool.open_connections == 3


@pytest.fixture
def host_d(tmp_path: Path, client_key: tuple[Path, str], trio: list[SSHDaemon]):  # type: ignore[no-untyped-def]
    """A fourth host that a test may stop and start again (same port, same key)."""
    daemon = start_sshd(tmp_path / "host-d", "127.0.0.6", client_key[1] + "\n", hostname="host-d")
    yield daemon
    daemon.stop()


def with_host(config: dict[str, Any], daemon: SSHDaemon, hosts: list[str]) -> dict[str, Any]:
    known_hosts = Path(config["connect_options"]["known_hosts"])
    extended = daemon.directory / "known_hosts_all"
    extended.write_text(known_hosts.read_text() + daemon.known_hosts_line() + "\n")
    options = {**config["connect_options"], "known_hosts": str(extended)}
    return {**config, "hosts": hosts, "connect_options": options}


async def test_failover_then_recovery_after_the_cooldown(
    make_kernelspec: KernelSpecFactory, trio_config: dict[str, Any], host_d: SSHDaemon
) -> None:
    d = host_d.destination("root")
    config = with_host(trio_config, host_d, [d, trio_config["hosts"][0]])
    # (long enough to outlast a start on a loaded machine, which the check below follows)
    config.update(policy="first-available", host_cooldown=5.0)
    host_d.stop()
    entry = HostEntry.parse(d)
    async with kernel_on(make_kernelspec, config) as (_, _, hostname):
        assert hostname == "host-a"  # host-d refused: passed over
        state = get_engine().placement
        assert "refused" in (state.unhealthy_reason(entry) or "")
    host_d.start()
    deadline = time.monotonic() + 10
    while state.unhealthy_reason(entry) is not None:
        assert time.monotonic() < deadline, "the cooldown did not end"
        await asyncio.sleep(0.05)
    async with kernel_on(make_kernelspec, config) as (_, _, hostname):
        assert hostname == "host-d"  # back after the cooldown, on a new connection


async def test_all_hosts_down_lists_every_host_and_cause(
    make_kernelspec: KernelSpecFactory, trio_config: dict[str, Any], host_d: SSHDaemon
) -> None:
    d = host_d.destination("root")
    refused = f"root@127.0.0.7:{host_d.port}"
    config = with_host(trio_config, host_d, [d, refused])
    host_d.stop()
    message = await start_failing(make_kernelspec, config, HostSelectionError)
    assert f"{d}: SSH to {d}: connection refused" in message
    assert f"{refused}: SSH to {refused}: connection refused" in message


async def test_restart_goes_elsewhere_when_its_host_is_down(
    make_kernelspec: KernelSpecFactory,
    trio_config: dict[str, Any],
    host_d: SSHDaemon,
    caplog: pytest.LogCaptureFixture,
) -> None:
    d = host_d.destination("root")
    config = with_host(trio_config, host_d, [d, trio_config["hosts"][1]])
    config.update(policy="first-available", orphan_timeout=1.0, reconnect_timeout=0)
    async with kernel_on(make_kernelspec, config) as (km, kc, hostname):
        assert hostname == "host-d"
        host_d.stop()  # its connection dies with it
        await asyncio.wait_for(km.provisioner.wait(), 30)
        await km.restart_kernel(now=True)
        await kc.wait_for_ready(timeout=60)
        out, _ = await execute(kc, "import socket; print(socket.gethostname())")
        assert out.strip() == "host-b"
    assert any("could not take it back" in r.getMessage() for r in caplog.records)


async def test_a_dead_connection_is_replaced_for_the_next_kernel(
    make_kernelspec: KernelSpecFactory, trio_config: dict[str, Any], host_d: SSHDaemon
) -> None:
    config = with_host(trio_config, host_d, [host_d.destination("root")])
    config.update(orphan_timeout=1.0, pool_idle_timeout=60.0, reconnect_timeout=0)
    async with kernel_on(make_kernelspec, config) as (km1, _, first):
        assert first == "host-d"
        host_d.stop()  # the pooled connection dies with the daemon
        host_d.start()
        async with kernel_on(make_kernelspec, config) as (_, kc2, second):
            assert second == "host-d"
            out, _ = await execute(kc2, "print('on a fresh connection')")
            assert out.strip() == "on a fresh connection"
        await asyncio.wait_for(km1.provisioner.wait(), 30)  # the first is gone with its link


async def test_idle_connections_close(
    make_kernelspec: KernelSpecFactory, trio_config: dict[str, Any]
) -> None:
    config = {**trio_config, "hosts": trio_config["hosts"][:1], "pool_idle_timeout": 0.2}
    async with kernel_on(make_kernelspec, config):
        assert get_engine().pool.open_connections == 1
    deadline = time.monotonic() + 5
    while get_engine().pool.open_connections:
        assert time.monotonic() < deadline, "the idle connection stayed open"
        await asyncio.sleep(0.05)


async def test_a_scripts_choice_is_checked_like_the_forms_and_kept_on_restart(
    make_kernelspec: KernelSpecFactory, trio_config: dict[str, Any]
) -> None:
    """nbclient passes ``user_options`` to the kernel manager's start: a host outside
    the kernelspec's choices is refused before anything starts; a good one is where the
    notebook runs, also after a restart."""
    import nbformat
    from nbclient import NotebookClient

    from ssh_provisioner import OptionRefused

    hosts = trio_config["hosts"]
    ksm, name = make_kernelspec({**trio_config, "user_options": {"host": {}}})
    notebook = nbformat.v4.new_notebook()
    notebook.cells.append(nbformat.v4.new_code_cell("import socket; print(socket.gethostname())"))
    km = AsyncKernelManager(kernel_name=name, kernel_spec_manager=ksm)
    with pytest.raises(OptionRefused, match="Host \\(host\\): 'nowhere' is not one of"):
        await NotebookClient(notebook, km=km).async_execute(user_options={"host": "nowhere"})
    assert km.provisioner is not None
    assert not km.provisioner.has_process

    km = AsyncKernelManager(kernel_name=name, kernel_spec_manager=ksm)
    await km.start_kernel(user_options={"host": hosts[2]})
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        out, _ = await execute(kc, "import socket; print(socket.gethostname())")
        assert out.strip() == "host-c"
        await km.restart_kernel()
        await kc.wait_for_ready(timeout=60)
        out, _ = await execute(kc, "import socket; print(socket.gethostname())")
        assert out.strip() == "host-c"
        assert km.provisioner.choices == {"host": hosts[2]}  # type: ignore[union-attr]
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
