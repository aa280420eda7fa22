"""Many idle remote kernels in one Jupyter Server, over three hosts.

    .venv/bin/python -m benchmarks.scale [--counts 50,100,200] [--login USER]

One real `jupyter server` (with benchmarks.loop_lag's sampler on its loop) starts
remote kernels one at a time, over three loopback sshd hosts with OpenSSH's default
MaxSessions of 10 (policy least-kernels),
up to each count in turn.  At each count it reports:
- the server's event-loop lag, p50 and p99 (sampled every 10 ms), idle for 5 s and
  while one kernel streams output;
- the server's RSS, and its growth per kernel since before the first;
- the launchers' RSS on the hosts (each launcher's own process, not its kernel's);
- SSH connections per host (the server's TCP connections to each sshd) and the SSH
  sessions open per host (launchers whose parent is still an sshd session);
- how long kernel N+1 takes to start (POST /api/kernels to its reply), and then, at
  the end, how long the shutdown of all of them takes, and what is left.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import socket
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from ssh_provisioner.host.ports import decode_address
from tests.e2e.jupyter_server import Server, start_server

from .loop_lag import STREAM, lag_samples, percentile
from .rig import Rig, loopback_hosts, write_kernelspecs

HOSTS = 3
IDLE_SAMPLE = 5.0  # seconds of idle loop-lag samples
LAUNCHER_MARK = b"ssh-provisioner payload"  # in every launcher's command line (payload.py)


def _status(pid: int, field: str) -> int:
    """A /proc/PID/status field in kB (VmRSS), or the parent pid (PPid); 0 if gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _private_kb(pid: int) -> int:
    """What the process alone holds (USS: private pages), from smaps_rollup: its RSS
    also counts the interpreter's pages it shares with every other launcher."""
    total = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    except OSError:
        pass
    return total


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def launchers() -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if LAUNCHER_MARK in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                continue
    return found


def connections_per_host(server_pid: int, rig: Rig) -> dict[str, int]:
    """The server's established TCP connections to each host's sshd (from /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{server_pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    remote_ends: list[tuple[str, int]] = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "01" and fields[9] in inodes:  # ESTABLISHED, ours
            address, port = fields[2].split(":")
            remote_ends.append((decode_address(address, socket.AF_INET), int(port, 16)))
    return {
        host.address: sum(1 for end in remote_ends if end == (host.address, host.port))
        for host in rig.hosts
    }


def sessions_open() -> int:
    """Launchers still in an SSH session (their parent is an sshd)."""
    return sum(1 for pid in launchers() if _comm(_status(pid, "PPid")).startswith("sshd"))


async def start_one(server: Server) -> tuple[str, float]:
    started = time.perf_counter()
    kernel = await server.request("POST", "/api/kernels", {"name": "ssh"})
    channels = await server.channels(kernel["id"])
    try:
        await channels.collect(channels.execute("1"), timeout=120)  # up and answering
    finally:
        channels.close()
    return kernel["id"], time.perf_counter() - started


async def streaming_lag(server: Server, kernel_id: str) -> list[float]:
    channels = await server.channels(kernel_id)
    try:
        await channels.collect(channels.execute("1"), timeout=60)
        await lag_samples(server)
        await channels.collect(channels.execute(STREAM), timeout=120)
        return await lag_samples(server)
    finally:
        channels.close()


async def gone(find: Callable[[], list[int]], timeout: float) -> None:
    """Until ``find`` finds nothing (a poll of /proc: nothing to await instead)."""
    deadline = time.monotonic() + timeout
    while find() and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.2)


def lag_text(samples: list[float]) -> str:
    p50, p99 = statistics.median(samples), percentile(samples, 0.99)
    return f"p50 {p50 * 1000:5.2f} ms  p99 {p99 * 1000:6.2f} ms"


async def run(server: Server, rig: Rig, counts: list[int]) -> None:
    pid = server.process.pid
    await asyncio.sleep(IDLE_SAMPLE)
    await lag_samples(server)
    base_rss = _status(pid, "VmRSS")
    print(f"server RSS before any kernel: {base_rss / 1024:.0f} MB")
    kernels: list[str] = []
    try:
        for count in counts:
            began = time.monotonic()
            while len(kernels) < count:
                kernel_id, _ = await start_one(server)
                kernels.append(kernel_id)
            print(f"\n{count} kernels ({time.monotonic() - began:.0f} s to start the last batch)")
            await lag_samples(server)
            await asyncio.sleep(IDLE_SAMPLE)
            print(f"  loop lag idle:        {lag_text(await lag_samples(server))}")
            print(f"  loop lag, 1 streams:  {lag_text(await streaming_lag(server, kernels[0]))}")
            rss = _status(pid, "VmRSS")
            per_kernel = (rss - base_rss) / 1024 / count
            print(f"  server RSS {rss / 1024:.0f} MB: {per_kernel:.2f} MB per kernel")
            found = launchers()  # (with a spare launcher per host, waiting)
            sizes = sorted(_status(p, "VmRSS") / 1024 for p in found)
            private = sorted(_private_kb(p) / 1024 for p in found)
            if sizes:
                print(
                    f"  launchers: {len(sizes)}, RSS median {statistics.median(sizes):.1f} MB "
                    f"(max {sizes[-1]:.1f}), of it private {statistics.median(private):.1f} MB "
                    f"(max {private[-1]:.1f})"
                )
            print(f"  SSH connections per host: {connections_per_host(pid, rig)}")
            print(f"  SSH sessions open (launchers under an sshd): {sessions_open()}")
            extra, seconds = await start_one(server)
            print(f"  kernel {count + 1} started in {seconds * 1000:.0f} ms")
            await server.request("DELETE", f"/api/kernels/{extra}")
    finally:
        began = time.monotonic()
        await asyncio.gather(
            *(server.request("DELETE", f"/api/kernels/{kernel_id}") for kernel_id in kernels)
        )
        print(f"\nshutdown of all {len(kernels)}: {time.monotonic() - began:.1f} s")
        await gone(launchers, 30)  # the launchers end after their kernels
        left = len(await server.request("GET", "/api/kernels"))
        print(f"left: {len(launchers())} launcher(s), {left} kernel(s)")


def measure(counts: list[int], login: str) -> None:
    with loopback_hosts(HOSTS, login, max_sessions=10) as rig:  # OpenSSH's default
        jupyter_path = rig.directory / "share" / "jupyter"
        config = rig.config(
            *rig.hosts, policy="least-kernels", pool_idle_timeout=600, orphan_timeout=60.0
        )
        write_kernelspecs(jupyter_path / "kernels", {"ssh": config})
        config_dir = rig.directory / "config"  # start_server's JUPYTER_CONFIG_DIR
        config_dir.mkdir()
        enable = {"ServerApp": {"jpserver_extensions": {"benchmarks.loop_lag": True}}}
        (config_dir / "jupyter_server_config.json").write_text(json.dumps(enable))
        server = start_server(rig.directory, jupyter_path, log_level="WARN")
        try:
            print(f"{HOSTS} loopback hosts, one jupyter server, logging in as {login}")
            asyncio.run(run(server, rig, counts))
        except Exception:
            print(server.log()[-6000:])
            raise
        finally:
            server.stop()
        asyncio.run(gone(launchers, 30))  # the spares end with the server's connections
        print(f"after the server stopped: {len(launchers())} launcher(s)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", default="50,100,200", help="kernel counts, rising")
    parser.add_argument("--login", default=getpass.getuser(), help="user to log in as")
    args = parser.parse_args()
    measure([int(n) for n in args.counts.split(",")], args.login)
