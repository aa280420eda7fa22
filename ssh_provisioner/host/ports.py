"""The ports a kernel opens on its own (TensorBoard, a Dask dashboard, Streamlit...).

Every TCP listener held by a process below the launcher: the kernel, its children, and
the daemons they start (the launcher is their subreaper, so they stay below it).  The
launcher reports them to its client, which forwards each one; the relay reaches them
for the client's streams.  The kernel's own channels are left out.

What the kernel listens on once it is up is its own machinery (its channels,
ipykernel's IOPub pipe): only the ports it opens later are reported.  A scan looks at
the sockets the launcher's processes hold (their descriptors, down its own process
tree); only when those changed does it read the host's TCP tables, which list every
socket of the host: read by each of 200 launchers every second, they made idle
launchers the host's main load (benchmarks/scale.py).
"""

import socket
import sys
import threading
from typing import Callable, Dict, FrozenSet, Optional, Set, Tuple

from .process import process_tree, socket_inodes

SCAN_INTERVAL = 1.0  # seconds between two looks at the listener tables
TABLES = (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6))
ANY_ADDRESS = ("0.0.0.0", "::")  # noqa: S104 (what a listener says, not a bind)


def decode_address(hex_address: str, family: int) -> str:
    """An address as /proc/net/tcp prints it: each 32-bit word in the host's order."""
    raw = bytes.fromhex(hex_address)
    if sys.byteorder == "little":
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return socket.inet_ntop(family, raw)


def listening_sockets() -> Dict[int, Tuple[str, int]]:
    """Socket inode -> (address, port) of every TCP listener in this network namespace."""
    found = {}
    for path, family in TABLES:
        try:
            with open(path) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != "0A":  # 0A: LISTEN
                continue
            address, _, port = fields[1].partition(":")
            try:
                found[int(fields[9])] = (decode_address(address, family), int(port, 16))
            except (ValueError, OSError):
                continue
    return found


def reachable_at(address: str) -> str:
    """Where the relay connects to a listener bound to ``address``."""
    if address == ANY_ADDRESS[0]:
        return "127.0.0.1"
    if address == ANY_ADDRESS[1]:
        return "::1"
    if address.startswith("::ffff:") and "." in address:
        return address[7:]
    return address


class PortWatch:
    """Reports the kernel's own TCP listeners, port -> the address it listens on,
    whenever they change (``report`` runs on the watch's thread)."""

    def __init__(
        self, launcher_pid: int, exclude: Set[int], report: Callable[[Dict[int, str]], None]
    ) -> None:
        self.launcher_pid = launcher_pid
        self.exclude = exclude  # the kernel's channels
        self.report = report
        self.ports: Dict[int, str] = {}
        self.stopped = threading.Event()
        self.seen: Optional[FrozenSet[int]] = None  # the socket inodes of the last scan

    def start(self) -> None:
        threading.Thread(target=self.run, daemon=True).start()

    def stop(self) -> None:
        self.stopped.set()

    def run(self) -> None:
        # What the kernel listens on already (it is up: no cell has run) is its own
        # machinery: its channels, and ipykernel's IOPub pipe for forked subprocesses
        # (a ZMQ socket on a random port).  Only the ports opened later are reported.
        self.exclude = set(self.exclude) | set(self.scan() or {})
        self.seen = None
        while not self.stopped.wait(SCAN_INTERVAL):
            ports = self.scan()
            if ports is not None and ports != self.ports:
                self.ports = ports
                self.report(dict(ports))

    def scan(self) -> Optional[Dict[int, str]]:
        """The kernel's listeners now; None if its processes' sockets are the same
        as at the last scan (no listener of theirs can have come or gone)."""
        owned = frozenset(socket_inodes(process_tree(self.launcher_pid)))
        if owned == self.seen:
            return None
        self.seen = owned
        sockets = listening_sockets()
        ports: Dict[int, str] = {}
        for inode in owned & set(sockets):
            address, port = sockets[inode]
            if port in self.exclude:
                continue
            # one port on both families: the one a loopback client reaches first wins
            if port not in ports or address in ANY_ADDRESS or address == "127.0.0.1":
                ports[port] = address
        return ports
