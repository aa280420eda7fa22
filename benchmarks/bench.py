"""ssh-provisioner against local kernels, measured in one run; prints ratios.

    .venv/bin/python -m benchmarks.bench [--rounds N] [--login USER]

Figures (each a ratio against a baseline measured in the same run):
- start -> first kernel_info reply: LocalProvisioner vs SSH cold (new connection)
  and warm (pooled connection reused);
- execute round trip of `pass`, median and p99: direct local kernel vs SSH;
- iopub throughput of 200 MB of display_data: direct vs SSH;
- 24 concurrent starts over 3 hosts (round-robin) vs 24 concurrent local starts;
- through the user's own OpenSSH master (use_control_master): start (cold: no link
  yet; warm: the pooled link) and the execute round trip, against asyncssh's own
  connection to the same host in the same run.

The SSH hosts are throwaway sshd daemons on 127.0.0.2-4, so the figures are the
provisioner's own overhead (launcher, handshake, forwards), not a network's.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

from jupyter_client.asynchronous import AsyncKernelClient
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

from ssh_provisioner.engine import shutdown_engine

from .rig import Rig, loopback_hosts, main, openssh_master, write_kernelspecs

IOPUB_MB = 200
CHUNK = 1 << 20
CONCURRENT = 24


MASTER_ALIAS = "bench-master"


def write_specs(rig: Rig, master_config: Path) -> KernelSpecManager:
    config = rig.config(pool_idle_timeout=600, use_control_master="never")
    pool = rig.config(*rig.hosts, pool_idle_timeout=600, policy="round-robin")
    master = {
        **rig.config(pool_idle_timeout=600, use_control_master="always"),
        "hosts": [MASTER_ALIAS],
        "connect_options": {"config": [str(master_config)], "agent_path": ""},
    }
    specs = {"local": None, "ssh": config, "ssh-pool": pool, "ssh-master": master}
    write_kernelspecs(rig.directory / "kernels", specs)
    return KernelSpecManager(kernel_dirs=[str(rig.directory / "kernels")])


@asynccontextmanager
async def kernel(
    ksm: KernelSpecManager, name: str, timing: list[float] | None = None
) -> AsyncIterator[AsyncKernelClient]:
    km = AsyncKernelManager(kernel_name=name, kernel_spec_manager=ksm)
    started = time.perf_counter()
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        # One request, queued by ZMQ until the connection is up: start -> first reply.
        msg_id = kc.kernel_info()
        while True:
            reply = await kc.get_shell_msg(timeout=60)
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        if timing is not None:
            timing.append(time.perf_counter() - started)
        await kc.wait_for_ready(timeout=60)  # also drains iopub's first status
        yield kc
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)


async def start_times(ksm: KernelSpecManager, rounds: int) -> dict[str, list[float]]:
    series = ("local", "ssh cold", "ssh warm", "master cold", "master warm")
    times: dict[str, list[float]] = {name: [] for name in series}
    for name in ("local", "ssh", "ssh-master"):  # warm the imports of every path once
        async with kernel(ksm, name):
            pass
    for _ in range(rounds):  # interleaved, so drift hits every series alike
        async with kernel(ksm, "local", times["local"]):
            pass
        for spec, label in (("ssh", "ssh"), ("ssh-master", "master")):
            await asyncio.to_thread(shutdown_engine)
            async with kernel(ksm, spec, times[f"{label} cold"]):
                pass
            async with kernel(ksm, spec, times[f"{label} warm"]):
                pass
    return times


async def round_trip(kc: AsyncKernelClient) -> float:
    started = time.perf_counter()
    reply = await kc.execute("pass", reply=True, timeout=30)
    elapsed = time.perf_counter() - started
    assert reply["content"]["status"] == "ok"
    return elapsed


async def iopub_throughput(kc: AsyncKernelClient) -> float:
    code = (
        "from IPython.display import publish_display_data\n"
        f"chunk = 'x' * {CHUNK}\n"
        f"for _ in range({IOPUB_MB}):\n"
        "    publish_display_data({'text/plain': chunk})\n"
    )
    received = 0
    started = time.perf_counter()
    msg_id = kc.execute(code)
    while True:
        msg = await kc.get_iopub_msg(timeout=120)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "display_data":
            received += len(msg["content"]["data"]["text/plain"])
        elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    elapsed = time.perf_counter() - started
    assert received == IOPUB_MB * CHUNK, received
    return received / elapsed / 1e6


def p99(samples: list[float]) -> float:
    return sorted(samples)[max(0, int(len(samples) * 0.99) - 1)]


def measure(rounds: int, login: str) -> None:
    with loopback_hosts(3, login) as rig, openssh_master(rig, rig.hosts[0], MASTER_ALIAS) as cfg:
        asyncio.run(report(write_specs(rig, cfg), rounds, login))


async def concurrent_starts(ksm: KernelSpecManager, name: str, count: int) -> tuple[float, int]:
    """Wall time until every one of ``count`` concurrent starts has answered kernel_info."""
    async with AsyncExitStack() as stack:
        started = time.perf_counter()
        results = await asyncio.gather(
            *(stack.enter_async_context(kernel(ksm, name)) for _ in range(count)),
            return_exceptions=True,
        )
        elapsed = time.perf_counter() - started
    return elapsed, sum(isinstance(result, BaseException) for result in results)


async def report(ksm: KernelSpecManager, rounds: int, login: str) -> None:
    try:
        await report_figures(ksm, rounds, login)
    finally:
        await asyncio.to_thread(shutdown_engine)


async def report_figures(ksm: KernelSpecManager, rounds: int, login: str) -> None:
    print(f"ssh-provisioner benchmark: login {login} on a loopback sshd, {rounds} rounds")
    times = await start_times(ksm, rounds)
    local = statistics.median(times["local"])
    print("\nstart -> first kernel_info reply (median)")
    print(f"  LocalProvisioner  {local * 1000:7.1f} ms   baseline")
    for name, target in (("ssh cold", 1.25), ("ssh warm", 1.10)):
        value = statistics.median(times[name])
        print(f"  {name:<17} {value * 1000:7.1f} ms   {value / local:.2f}x  (target <= {target}x)")
    print("  through the user's OpenSSH master (vs asyncssh's own connection, same host)")
    for name, target in (("master cold", 1.25), ("master warm", 1.10)):
        value = statistics.median(times[name])
        own = statistics.median(times[name.replace("master", "ssh")])
        print(
            f"  {name:<17} {value * 1000:7.1f} ms   {value / local:.2f}x  (target <= {target}x)"
            f"   {value / own:.2f}x asyncssh's"
        )

    async with (
        kernel(ksm, "local") as direct,
        kernel(ksm, "ssh") as remote,
        kernel(ksm, "ssh-master") as mastered,
    ):
        # alternate the kernels, so that drift on a shared machine hits all alike
        direct_rtt: list[float] = []
        remote_rtt: list[float] = []
        master_rtt: list[float] = []
        for _ in range(50 * rounds):
            direct_rtt.append(await round_trip(direct))
            remote_rtt.append(await round_trip(remote))
            master_rtt.append(await round_trip(mastered))
        print("\nexecute round trip of `pass`")
        for label, pick in (("median", statistics.median), ("p99", p99)):
            base, value, other = pick(direct_rtt), pick(remote_rtt), pick(master_rtt)
            print(
                f"  {label:<6} direct {base * 1000:6.2f} ms   ssh {value * 1000:6.2f} ms   "
                f"{value / base:.2f}x  (target <= 1.08x)   through the master "
                f"{other * 1000:6.2f} ms   {other / base:.2f}x"
            )
        direct_mbs: list[float] = []
        remote_mbs: list[float] = []
        for _ in range(2):
            direct_mbs.append(await iopub_throughput(direct))
            remote_mbs.append(await iopub_throughput(remote))
        base, value = statistics.mean(direct_mbs), statistics.mean(remote_mbs)
        print(f"\niopub throughput, {IOPUB_MB} MB of display_data (mean of 2, alternated)")
        print(
            f"  direct {base:6.0f} MB/s   ssh {value:6.0f} MB/s   "
            f"{value / base:.2f}x  (target >= 0.9x)"
        )
    await asyncio.to_thread(shutdown_engine)
    local_time, local_failures = await concurrent_starts(ksm, "local", CONCURRENT)
    ssh_time, ssh_failures = await concurrent_starts(ksm, "ssh-pool", CONCURRENT)
    print(f"\n{CONCURRENT} concurrent starts, all answering kernel_info (3 hosts, round-robin)")
    print(f"  LocalProvisioner  {local_time:6.2f} s   failures {local_failures}   baseline")
    print(
        f"  ssh, cold pool    {ssh_time:6.2f} s   failures {ssh_failures}   "
        f"{ssh_time / local_time:.2f}x  (target <= 1.3x, 0 failures)"
    )


if __name__ == "__main__":
    main(__doc__, measure)
