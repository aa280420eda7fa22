"""A host behind a link we can cut: a network namespace of our own, joined by a veth
pair. Its addresses exist only between this machine and that namespace."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from benchmarks.delay_line import claimed_block

# Each link a /30 of its own in 10.199/16 (the Slurm rig takes 10.200-249, the WAN
# rig 10.197), claimed under a lock as the first block no interface has: pytest-xdist
# workers, and the test sessions of other checkouts on this machine, never share one.


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
        with claimed_block("10.199.0.0") as (host_side, namespace_side):
            _ip("addr", "add", f"{host_side}/30", "dev", veth)
        _ip("link", "set", veth, "up")
        _ip("-n", namespace, "addr", "add", f"{namespace_side}/30", "dev", peer)
        _ip("-n", namespace, "link", "set", peer, "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
        yield Link(namespace, veth, namespace_side, host_side)
    finally:
        subprocess.run(["ip", "link", "del", veth], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)
