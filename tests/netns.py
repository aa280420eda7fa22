"""A host behind a link we can cut: a network namespace of our own, joined by a veth
pair. Its addresses exist only between this machine and that namespace."""

from __future__ import annotations

import itertools
import os
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

# Each link a /30 of its own in 10.199/16 (the Slurm rig takes 10.200-249): the third
# octet is the pytest-xdist worker's (workers never share a block), the fourth counts
# the links this process has made.
_links_made = itertools.count()


def _block() -> tuple[str, str]:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    third = int(worker) % 256 if worker.isdigit() else 0
    base = 4 * (next(_links_made) % 64)
    return f"10.199.{third}.{base + 1}", f"10.199.{third}.{base + 2}"


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
    host_side, namespace_side = _block()
    _ip("netns", "add", namespace)
    try:
        _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", namespace)
        _ip("addr", "add", f"{host_side}/30", "dev", veth)
        _ip("link", "set", veth, "up")
        _ip("-n", namespace, "addr", "add", f"{namespace_side}/30", "dev", peer)
        _ip("-n", namespace, "link", "set", peer, "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
        yield Link(namespace, veth, namespace_side, host_side)
    finally:
        subprocess.run(["ip", "link", "del", veth], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)
