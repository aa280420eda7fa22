"""A host behind a link we can cut: a network namespace of our own, joined by a veth
pair. Its addresses exist only between this machine and that namespace."""

from __future__ import annotations

import fcntl
import ipaddress
import re
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

# Each link a /30 of its own in 10.199/16 (the Slurm rig takes 10.200-249), claimed
# under a lock as the first block no interface has: pytest-xdist workers, and the test
# sessions of other checkouts on this machine, never share one.
_CLAIM_LOCK = "/run/lock/ssh-provisioner-tests-netns.lock"


@contextmanager
def _claimed_block() -> Iterator[tuple[str, str]]:
    """(host side, namespace side) of a free /30; the caller assigns the host side
    before this returns (so the next claim sees it taken)."""
    with open(_CLAIM_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        shown = subprocess.run(
            ["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, check=True
        ).stdout
        taken = {
            int(ipaddress.IPv4Address(found)) & ~3
            for found in re.findall(r"inet (10\.199\.\d+\.\d+)/", shown)
        }
        first = int(ipaddress.IPv4Address("10.199.0.0"))
        base = next(b for b in range(first, first + 65536, 4) if b not in taken)
        yield str(ipaddress.IPv4Address(base + 1)), str(ipaddress.IPv4Address(base + 2))


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@dataclass(frozen=True)
class Link:
    namespace: str
    veth: str
    address: str  # the namespace's side
    host_side: str

    def down(self) -> None:
        _ip("link", "set", self.veth, "down")

    def up(self) -> None:
        _ip("link", "set", self.veth, "up")


@contextmanager
def namespace_host() -> Iterator[Link]:
    tag = uuid.uuid4().hex[:6]
    namespace, veth, peer = f"sshp-{tag}", f"sshp{tag}", f"sshp{tag}p"
    _ip("netns", "add", namespace)
    try:
        _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", namespace)
        with _claimed_block() as (host_side, namespace_side):
            _ip("addr", "add", f"{host_side}/30", "dev", veth)
        _ip("link", "set", veth, "up")
        _ip("-n", namespace, "addr", "add", f"{namespace_side}/30", "dev", peer)
        _ip("-n", namespace, "link", "set", peer, "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
        yield Link(namespace, veth, namespace_side, host_side)
    finally:
        subprocess.run(["ip", "link", "del", veth], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)
