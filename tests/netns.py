"""A host behind a link we can cut: a network namespace of our own, joined by a veth
pair. Its addresses exist only between this machine and that namespace."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

HOST_SIDE = "10.213.77.1"
NAMESPACE_SIDE = "10.213.77.2"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@dataclass(frozen=True)
class Link:
    namespace: str
    veth: str
    address: str = NAMESPACE_SIDE

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
        _ip("addr", "add", f"{HOST_SIDE}/30", "dev", veth)
        _ip("link", "set", veth, "up")
        _ip("-n", namespace, "addr", "add", f"{NAMESPACE_SIDE}/30", "dev", peer)
        _ip("-n", namespace, "link", "set", peer, "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
        yield Link(namespace, veth)
    finally:
        subprocess.run(["ip", "link", "del", veth], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)
