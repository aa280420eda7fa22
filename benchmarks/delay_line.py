"""A host across a wide-area link: a network namespace reached through a userspace
delay line, for the WAN benchmark and the tests that need a real round trip.

This kernel has no ``sch_netem`` (see ../shared/WAN-FACTS.md), so the delay is ours: two
TUN devices, one on each side of the link, and a small process between them that holds
each packet for the one-way delay, drops a share of them for a lossy profile, and lets
``tc tbf`` on both TUN ends cap the rate.  TUN offloads let whole GSO segments (up to
64 KiB) through, so the line itself keeps up with a fast link; with loss they are off,
so that what is lost is one packet, as on a real link.

    python benchmarks/delay_line.py OUTER INNER DELAY_MS LOSS   (what the rig runs)
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import ipaddress
import os
import random
import re
import select
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
IFF_TUN, IFF_NO_PI, IFF_VNET_HDR = 0x0001, 0x1000, 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN = 1, 2, 4, 8
READ_MAX = 65536 + 64  # a GSO segment and its virtio header
CLAIM_LOCK = "/run/lock/ssh-provisioner-tests-netns.lock"


@dataclass(frozen=True)
class Profile:
    name: str
    one_way_ms: float
    rate_mbit: int | None = None
    loss: float = 0.0

    @property
    def round_trip_ms(self) -> float:
        return 2 * self.one_way_ms


PROFILES = {
    profile.name: profile
    for profile in (
        Profile("lan", 0),  # the same line with no delay: what the emulator itself costs
        Profile("wan50", 25),
        Profile("wan50-100mbit", 25, rate_mbit=100),
        Profile("wan100-loss", 50, loss=0.005),
    )
}


@contextmanager
def claimed_block(network: str) -> Iterator[tuple[str, str]]:
    """The two usable addresses of the first /30 of ``network`` (a /16) that no
    interface has, claimed under a lock that pytest-xdist workers and other checkouts'
    tests share; the caller assigns the first address before this returns."""
    prefix = network.rsplit(".", 2)[0]
    with open(CLAIM_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        shown = subprocess.run(
            ["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, check=True
        ).stdout
        taken = {
            int(ipaddress.IPv4Address(found)) & ~3
            for found in re.findall(rf"inet ({re.escape(prefix)}\.\d+\.\d+)[/ ]", shown)
        }
        first = int(ipaddress.IPv4Address(network))
        base = next(b for b in range(first, first + 65536, 4) if b not in taken)
        yield str(ipaddress.IPv4Address(base + 1)), str(ipaddress.IPv4Address(base + 2))


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@dataclass(frozen=True)
class WideAreaHost:
    """A network namespace behind the delay line: ``address`` is the host's side."""

    profile: Profile
    namespace: str
    address: str
    outer_address: str


@contextmanager
def wide_area_host(profile: Profile) -> Iterator[WideAreaHost]:
    """A namespace reachable only across ``profile``'s link; all gone afterwards."""
    tag = uuid.uuid4().hex[:6]
    namespace, outer, inner = f"sshp-w{tag}", f"sshpw{tag}o", f"sshpw{tag}i"
    _ip("netns", "add", namespace)
    line = None
    try:
        line = subprocess.Popen(
            [sys.executable, __file__, outer, inner, str(profile.one_way_ms), str(profile.loss)],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        assert line.stdout is not None
        if line.stdout.readline() != b"ready\n":
            raise RuntimeError(f"the delay line did not start (exit {line.wait()})")
        _ip("link", "set", inner, "netns", namespace)  # its descriptor stays the line's
        with claimed_block("10.197.0.0") as (outer_address, address):
            _ip("addr", "add", outer_address, "peer", address, "dev", outer)
        _ip("link", "set", outer, "up")
        _ip("-n", namespace, "addr", "add", address, "peer", outer_address, "dev", inner)
        _ip("-n", namespace, "link", "set", inner, "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
        if profile.rate_mbit:
            rate = ["tbf", "rate", f"{profile.rate_mbit}mbit", "burst", "64kb", "limit", "1mb"]
            _ip_tc = ["tc", "qdisc", "add", "dev"]
            subprocess.run([*_ip_tc, outer, "root", *rate], check=True, capture_output=True)
            subprocess.run(
                ["ip", "netns", "exec", namespace, *_ip_tc, inner, "root", *rate],
                check=True,
                capture_output=True,
            )
        yield WideAreaHost(profile, namespace, address, outer_address)
    finally:
        if line is not None:
            line.kill()
            line.wait()
            if line.stdout is not None:
                line.stdout.close()
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)


# -- the line itself: stdlib only, run as a script -------------------------------------


def _open_tun(name: str, offload: bool) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if offload else 0)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), flags))
    if offload:  # whole GSO segments cross; each keeps its virtio header, passed as is
        fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN)
    return fd


def run_line(outer: str, inner: str, one_way_ms: float, loss: float) -> None:
    offload = loss == 0
    ends = (_open_tun(outer, offload), _open_tun(inner, offload))
    other = {ends[0]: ends[1], ends[1]: ends[0]}
    delay = one_way_ms / 1000
    queues: dict[int, collections.deque[tuple[float, bytes]]] = {
        fd: collections.deque() for fd in ends
    }  # keyed by the end each packet leaves by
    chance = random.Random(0x5EED)  # noqa: S311 - a lossy wire, not a secret
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while True:
        now = time.monotonic()
        heads = [queue[0][0] for queue in queues.values() if queue]
        timeout = max(0.0, min(heads) - now) if heads else None
        readable, _, _ = select.select(ends, [], [], timeout)
        now = time.monotonic()
        for fd in readable:
            for _ in range(64):  # a burst at a time, so one direction cannot starve
                try:
                    packet = os.read(fd, READ_MAX)
                except BlockingIOError:
                    break
                if loss and chance.random() < loss:
                    continue
                queues[other[fd]].append((now + delay, packet))
        for fd, queue in queues.items():
            while queue and queue[0][0] <= now:
                with contextlib.suppress(OSError):  # the far side is down: lost, as on a wire
                    os.write(fd, queue.popleft()[1])


if __name__ == "__main__":
    run_line(sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]))
