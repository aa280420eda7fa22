"""ssh-provisioner over wide-area links, against the floors measured in the same run.

    .venv/bin/python -m benchmarks.wan [--rounds N] [--login USER] [--profiles lan,wan50,...]

Each profile is a host in a network namespace behind a userspace delay line
(`benchmarks/delay_line.py`): `lan` (the line with no delay: the control), `wan50`
(25 ms each way), `wan50-100mbit`, `wan100-loss` (50 ms each way, 0.5% of packets
lost).  Every profile's host is up at once, and each round visits them all in turn, so
drift on a loaded machine hits every figure alike.

Floors, per profile: the link's round trip (a TCP connect), OpenSSH's full connection
(`ssh host true`), OpenSSH through a master, and OpenSSH's throughput (`ssh host head -c`,
first byte to last), direct and through the master.  A local kernel (LocalProvisioner)
is the floor for what the kernel itself costs.  Every latency of ours is reported as
round trips beyond that local figure, (ours - local) / RTT, and beyond the same figure
on `lan`, (ours - lan) / RTT, which is steadier: a local kernel's start swings by more
than a round trip here.
The round trips each operation makes, by why, come from the `ssh_provisioner.trips`
debug log (see docs/benchmarks.md).  An instant start takes a kernel kept ready
(``prespawn: 1``): it is compared with a local kernel's start (target <= 0.3x on `lan`)
and with one round trip (target <= 1 RTT + 10 ms).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import statistics
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.asyncio
from jupyter_client.asynchronous import AsyncKernelClient
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

from ssh_provisioner import prespawn
from ssh_provisioner.engine import get_engine, shutdown_engine
from ssh_provisioner.throwaway import SSHDaemon, generate_key, running_sshd

from .delay_line import PROFILES, Profile, WideAreaHost, wide_area_host
from .rig import Rig, write_kernelspecs

BULK_MB = {"lan": 50, "wan50": 50, "wan50-100mbit": 25, "wan100-loss": 2}
EXECUTES = 20  # per kernel, per round
SLEEPER = "import time; time.sleep(30)"


class TripCounter(logging.Handler):
    """Counts the `ssh_provisioner.trips` debug lines (one per round trip) by why."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: collections.Counter[str] = collections.Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.seen[str(record.args[1] if record.args else record.msg)] += 1  # type: ignore[index]

    @contextmanager
    def counting(self) -> Iterator[collections.Counter[str]]:
        self.seen = collections.Counter()
        counted: collections.Counter[str] = collections.Counter()
        try:
            yield counted
        finally:
            counted.update(self.seen)


@dataclass
class Figures:
    """Every sample of one profile (or of the local kernel), by name."""

    samples: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    trips: dict[str, collections.Counter[str]] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter)
    )

    def median(self, name: str) -> float:
        return statistics.median(self.samples[name])


@dataclass(frozen=True)
class Site:
    """One profile's host: its sshd, the ssh command that reaches it, its kernelspec."""

    profile: Profile
    host: WideAreaHost
    daemon: SSHDaemon
    ssh: list[str]
    master: list[str]
    kernel: str


def _ssh_argv(rig: Rig, daemon: SSHDaemon) -> list[str]:
    options = rig.connect_options
    return [
        "ssh", "-i", options["client_keys"][0], "-o", "IdentitiesOnly=yes",
        "-o", f"UserKnownHostsFile={options['known_hosts']}", "-o", "StrictHostKeyChecking=yes",
        "-o", "BatchMode=yes", "-F", "/dev/null", "-p", str(daemon.port),
        f"{rig.login}@{daemon.address}",
    ]  # fmt: skip


@contextmanager
def sites(names: list[str], login: str, directory: Path) -> Iterator[tuple[Rig, list[Site]]]:
    key = directory / "client_ed25519"
    public = generate_key(key)
    with ExitStack() as stack:
        hosts = [stack.enter_context(wide_area_host(PROFILES[name])) for name in names]
        daemons = [
            stack.enter_context(
                running_sshd(directory / host.profile.name, host.address, public + "\n",
                             netns=host.namespace)
            )
            for host in hosts
        ]  # fmt: skip
        known_hosts = directory / "known_hosts"
        known_hosts.write_text("".join(d.known_hosts_line() + "\n" for d in daemons))
        options = {
            "client_keys": [str(key)],
            "known_hosts": str(known_hosts),
            "config": [],
            "agent_path": "",
        }
        rig = Rig(directory, daemons, login, options)
        made = []
        for host, daemon in zip(hosts, daemons, strict=True):
            ssh = _ssh_argv(rig, daemon)
            control = directory / f"cm-{host.profile.name}"
            master = [*ssh[:1], "-o", f"ControlPath={control}", *ssh[1:]]
            subprocess.run([*master[:-1], "-o", "ControlMaster=yes", "-fN", master[-1]],
                           check=True, stdin=subprocess.DEVNULL, timeout=60)  # fmt: skip
            stack.callback(
                subprocess.run, [*master[:-1], "-O", "exit", master[-1]], capture_output=True
            )
            made.append(Site(host.profile, host, daemon, ssh, master, host.profile.name))
        specs = {
            site.kernel: rig.config(site.daemon, pool_idle_timeout=600, use_control_master="never")
            for site in made
        }
        for site in made:  # the same, with a kernel kept ready (prespawn)
            specs[f"{site.kernel}-instant"] = {**specs[site.kernel], "prespawn": 1}
        write_kernelspecs(directory / "kernels", {"local": None, **specs})
        yield rig, made


# -- floors -----------------------------------------------------------------------------


def link_round_trip(address: str, port: int) -> float:
    started = time.perf_counter()
    with socket.create_connection((address, port), timeout=10):
        return time.perf_counter() - started


def timed_command(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, stdin=subprocess.DEVNULL, timeout=120)
    return time.perf_counter() - started


def ssh_throughput(ssh: list[str], megabytes: int) -> float:
    """MB/s of ``head -c`` through ``ssh``, from its first byte to its last."""
    command = [*ssh, f"head -c {megabytes * 1_000_000} /dev/zero"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL) as child:
        assert child.stdout is not None
        first = child.stdout.read(1)
        started = time.perf_counter()
        received = len(first)
        while chunk := child.stdout.read1(1 << 20):
            received += len(chunk)
        elapsed = time.perf_counter() - started
    assert received == megabytes * 1_000_000, received
    return received / elapsed / 1e6


# -- kernels ----------------------------------------------------------------------------


async def first_reply(kc: AsyncKernelClient) -> None:
    msg_id = kc.kernel_info()
    while (await kc.get_shell_msg(timeout=120))["parent_header"].get("msg_id") != msg_id:
        pass


@asynccontextmanager
async def started(
    ksm: KernelSpecManager, name: str, figures: Figures, label: str, trips: TripCounter
) -> AsyncIterator[tuple[AsyncKernelManager, AsyncKernelClient]]:
    km = AsyncKernelManager(kernel_name=name, kernel_spec_manager=ksm)
    with trips.counting() as counted:
        began = time.perf_counter()
        await km.start_kernel()
        kc = km.client()
        kc.start_channels()
        await first_reply(kc)
        figures.samples[label].append(time.perf_counter() - began)
    figures.trips[label].update(counted)
    try:
        await kc.wait_for_ready(timeout=60)
        yield km, kc
    finally:
        kc.stop_channels()
        if km.has_kernel:
            await km.shutdown_kernel(now=True)


async def operate(
    km: AsyncKernelManager, kc: AsyncKernelClient, figures: Figures, trips: TripCounter
) -> None:
    """Execute, interrupt, restart and shutdown, each timed and its trips counted."""
    for _ in range(EXECUTES):
        began = time.perf_counter()
        reply = await kc.execute("pass", reply=True, timeout=60)
        figures.samples["execute"].append(time.perf_counter() - began)
        assert reply["content"]["status"] == "ok"
    msg_id = kc.execute(SLEEPER)
    await until_busy(kc, msg_id)
    with trips.counting() as counted:
        began = time.perf_counter()
        await km.interrupt_kernel()
        reply = await kc.get_shell_msg(timeout=60)  # the interrupted cell's reply
        figures.samples["interrupt"].append(time.perf_counter() - began)
    figures.trips["interrupt"].update(counted)
    assert reply["content"]["status"] == "error", reply["content"]
    await until_idle(kc, msg_id)
    with trips.counting() as counted:
        began = time.perf_counter()
        await km.restart_kernel()
        await first_reply(kc)
        figures.samples["restart"].append(time.perf_counter() - began)
    figures.trips["restart"].update(counted)
    await kc.wait_for_ready(timeout=60)
    with trips.counting() as counted:
        began = time.perf_counter()
        await km.shutdown_kernel()
        figures.samples["shutdown"].append(time.perf_counter() - began)
    figures.trips["shutdown"].update(counted)


async def until_busy(kc: AsyncKernelClient, msg_id: str) -> None:
    await _until_status(kc, msg_id, "busy")


async def until_idle(kc: AsyncKernelClient, msg_id: str) -> None:
    await _until_status(kc, msg_id, "idle")


async def _until_status(kc: AsyncKernelClient, msg_id: str, state: str) -> None:
    while True:
        msg = await kc.get_iopub_msg(timeout=60)
        if (
            msg["parent_header"].get("msg_id") == msg_id
            and msg["msg_type"] == "status"
            and msg["content"]["execution_state"] == state
        ):
            return


async def iopub_bulk(km: AsyncKernelManager, kc: AsyncKernelClient, megabytes: int) -> float:
    """MB/s of ``megabytes`` of display_data on IOPub, from its first message to its
    last, read by a bare ZMQ subscriber, the only one (``kc``'s channels are stopped):
    the transport's figure, not jupyter_client's decoding of megabyte messages."""
    chunk = 1_000_000
    code = (
        "from IPython.display import publish_display_data\n"
        f"for _ in range({megabytes}):\n"
        f"    publish_display_data({{'text/plain': 'x' * {chunk}}})\n"
    )
    kc.stop_channels()
    shell = km.client()
    shell.start_channels(iopub=False, stdin=False, hb=False, control=False)
    subscriber = zmq.asyncio.Context.instance().socket(zmq.SUB)
    try:
        subscriber.setsockopt(zmq.SUBSCRIBE, b"")
        subscriber.connect(f"tcp://127.0.0.1:{km.get_connection_info()['iopub_port']}")
        for _ in range(150):  # subscribed once it hears the kernel (a request's status)
            await shell.kernel_info(reply=True, timeout=30)
            if await subscriber.poll(200):
                break
        else:
            raise TimeoutError("the IOPub subscriber heard nothing in 30 s")
        msg_id = shell.execute(code)
        received, began = 0, 0.0
        while received < megabytes * chunk:
            frames = await asyncio.wait_for(subscriber.recv_multipart(copy=False), 300)
            if sum(len(frame.bytes) for frame in frames) >= chunk:
                if not received:
                    began = time.perf_counter()
                received += chunk
        elapsed = time.perf_counter() - began
        while (await shell.get_shell_msg(timeout=300))["parent_header"].get("msg_id") != msg_id:
            pass
    finally:
        subscriber.close(0)
        shell.stop_channels()
    return (received - chunk) / elapsed / 1e6


# -- one run ----------------------------------------------------------------------------


async def one_round(
    ksm: KernelSpecManager,
    made: list[Site],
    local: Figures,
    figures: dict[str, Figures],
    trips: TripCounter,
) -> None:
    async with started(ksm, "local", local, "start", trips) as (km, kc):
        await operate(km, kc, local, trips)
    async with started(ksm, "local", Figures(), "bulk", trips) as (km, kc):
        local.samples["MB/s"].append(await iopub_bulk(km, kc, BULK_MB["lan"]))
    for site in made:
        mine = figures[site.profile.name]
        for _ in range(5):
            mine.samples["rtt"].append(link_round_trip(site.daemon.address, site.daemon.port))
        mine.samples["ssh true"].append(await asyncio.to_thread(timed_command, [*site.ssh, "true"]))
        mine.samples["master true"].append(
            await asyncio.to_thread(timed_command, [*site.master, "true"])
        )
        megabytes = BULK_MB[site.profile.name]
        mine.samples["ssh MB/s"].append(
            await asyncio.to_thread(ssh_throughput, site.ssh, megabytes)
        )
        mine.samples["master MB/s"].append(
            await asyncio.to_thread(ssh_throughput, site.master, megabytes)
        )
        await asyncio.to_thread(shutdown_engine)  # a cold start: no pooled connection
        async with started(ksm, site.kernel, mine, "cold start", trips) as (km, kc):
            await operate(km, kc, mine, trips)
        async with started(ksm, site.kernel, mine, "warm start", trips) as (km, kc):
            mine.samples["MB/s"].append(await iopub_bulk(km, kc, megabytes))
        instant = f"{site.kernel}-instant"
        async with started(ksm, instant, Figures(), "fill", trips):
            pass  # the kernelspec's first start in this engine: its shelf fills
        await one_kept_ready()
        async with started(ksm, instant, mine, "instant start", trips):
            pass


async def one_kept_ready(timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not get_engine().reserve.ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no kernel kept ready after {timeout}s")
        await asyncio.sleep(0.01)


def p99(samples: list[float]) -> float:
    return sorted(samples)[max(0, int(len(samples) * 0.99) - 1)]


LATENCIES = ("cold start", "warm start", "execute", "interrupt", "restart", "shutdown")


TARGETS = {
    "cold start": "<= ssh true + local + 1 RTT",
    "warm start": "<= local + 1 RTT",
    "execute": "<= local + 1 RTT + 1 ms",
    "interrupt": "<= local + 1 RTT + 1 ms",
    "restart": "<= local + 1 RTT",
    "shutdown": "<= local + 1 RTT",
}


def report(local: Figures, figures: dict[str, Figures], rounds: int) -> None:
    base = {op: local.median("start" if op.endswith(" start") else op) for op in LATENCIES}
    lan = figures.get("lan")
    for name, mine in figures.items():
        rtt = mine.median("rtt")
        print(f"\n{name}: link round trip {rtt * 1000:.2f} ms (TCP connect, median)")
        ssh_true, master_true = mine.median("ssh true"), mine.median("master true")
        print(
            f"  OpenSSH: ssh host true {ssh_true * 1000:.0f} ms ({ssh_true / rtt:.1f} RTT), "
            f"through a master {master_true * 1000:.0f} ms ({master_true / rtt:.1f} RTT)"
        )
        print(
            f"  {'':<12} {'local':>8} {'ours':>8} {'+ms':>7} {'RTT beyond':>10} {'vs lan':>7}"
            f"  target                        round trips logged, per operation"
        )
        for op in LATENCIES:
            ours = mine.median(op)
            floor = base[op] + (ssh_true if op == "cold start" else 0)
            far = rtt > 0.002  # on lan a round trip is noise: read the +ms
            beyond = f"{(ours - floor) / rtt:10.2f}" if far else f"{'-':>10}"
            vs_lan = f"{(ours - lan.median(op)) / rtt:7.2f}" if far and lan else f"{'-':>7}"
            logged = ", ".join(f"{why} {n / rounds:g}" for why, n in sorted(mine.trips[op].items()))
            print(
                f"  {op:<12} {base[op] * 1000:6.1f}ms {ours * 1000:6.1f}ms"
                f" {(ours - floor) * 1000:+7.1f} {beyond} {vs_lan}  {TARGETS[op]:<29} {logged}"
            )
        instant, start = mine.median("instant start"), base["warm start"]
        logged = ", ".join(
            f"{why} {n / rounds:g}" for why, n in sorted(mine.trips["instant start"].items())
        )
        print(
            f"  {'instant':<12} {start * 1000:6.1f}ms {instant * 1000:6.1f}ms"
            f" {instant / start:.2f}x local (target <= 0.3x on lan),"
            f" {(instant - rtt) * 1000:+.1f} ms beyond 1 RTT (target <= +10 ms)  {logged}"
        )
        ours_p99, local_p99 = p99(mine.samples["execute"]), p99(local.samples["execute"])
        print(f"  {'execute p99':<12} {local_p99 * 1000:6.1f}ms {ours_p99 * 1000:6.1f}ms")
        ours_mbs, ssh_mbs = statistics.median(mine.samples["MB/s"]), mine.median("ssh MB/s")
        master_mbs = mine.median("master MB/s")
        direct = statistics.median(local.samples["MB/s"])
        print(
            f"  IOPub bulk {BULK_MB[name]} MB: ours {ours_mbs:.1f} MB/s, OpenSSH {ssh_mbs:.1f} MB/s"
            f" ({ours_mbs / ssh_mbs:.2f}x; target >= 0.9x), through its master"
            f" {master_mbs:.1f} MB/s; a local kernel {direct:.1f} MB/s"
        )


async def run(names: list[str], rounds: int, login: str, directory: Path) -> None:
    trips = TripCounter()
    trip_log = logging.getLogger("ssh_provisioner.trips")
    trip_log.addHandler(trips)
    trip_log.setLevel(logging.DEBUG)
    prespawn.enable()  # as the server extension does in Jupyter Server
    with sites(names, login, directory) as (_, made):
        ksm = KernelSpecManager(kernel_dirs=[str(directory / "kernels")])
        local = Figures()
        figures = {site.profile.name: Figures() for site in made}
        try:
            for site in made:  # warm every path's imports once, unmeasured
                async with started(ksm, site.kernel, Figures(), "warm-up", trips):
                    pass
            for _ in range(rounds):
                await one_round(ksm, made, local, figures, trips)
        finally:
            await asyncio.to_thread(shutdown_engine)
        print(f"ssh-provisioner over wide-area links: login {login}, {rounds} rounds")
        report(local, figures, rounds)


def main() -> None:
    import argparse
    import getpass
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="measurements per series")
    parser.add_argument("--login", default=getpass.getuser(), help="user to log in as")
    parser.add_argument("--profiles", default=",".join(PROFILES), help="comma-separated")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sshp-wan-") as tmp:
        Path(tmp).chmod(0o755)  # the login user reads the authorized keys below it
        asyncio.run(run(args.profiles.split(","), args.rounds, args.login, Path(tmp)))


if __name__ == "__main__":
    main()
