"""What a test left behind, judged only on what that test created.

Other kernels of this package may run on the same machine meanwhile (a developer's own
remote kernel, another checkout's tests): they are none of a test's business.  A
test's kernels are known by two marks:

- a tag in their environment: ``KERNEL_SSHP_TEST`` (jupyter_client passes the
  environment on, and the provisioner forwards ``KERNEL_*`` to the host), set for the
  test and inherited by the clients it runs in subprocesses (a Jupyter Server,
  papermill, ``jupyter console``);
- their kernel ids, recorded as this process's provisioners launch them: the
  launcher names its runtime dir, and its working directory, after its kernel
  (``jupyter-sshp-<first 8 of the id>-…``), so a launcher or a dir whose kernel is
  gone is still known.

Listeners: the 127.0.0.1 ports this process holds open (a kernel's local ports are
bound here).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ssh_provisioner.host.supervisor import RUNTIME_DIR_PREFIX
from ssh_provisioner.payload import LAUNCHER_BEGINS

TAG_VARIABLE = "KERNEL_SSHP_TEST"
LAUNCHER_MARK = LAUNCHER_BEGINS.encode()  # in every launcher's cmdline (BOOTSTRAP)
KERNEL_MARK = RUNTIME_DIR_PREFIX.encode()  # a kernel's connection file is in a runtime dir
LOOPBACK = "0100007F"  # 127.0.0.1 in /proc/net/tcp byte order


@dataclass
class TestMarks:
    """What identifies one test's kernels."""

    tag: str
    kernel_ids: set[str] = field(default_factory=set)  # first 8 characters

    def owns_dir(self, name: str) -> bool:
        label = name[len(RUNTIME_DIR_PREFIX) :].split("-", 1)[0]
        return name.startswith(RUNTIME_DIR_PREFIX) and label in self.kernel_ids


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError:
        return b""


def _pids() -> Iterable[int]:
    return (int(entry) for entry in os.listdir("/proc") if entry.isdigit())


def _parent(pid: int) -> int:
    stat = _read(f"/proc/{pid}/stat")
    try:
        return int(stat.rsplit(b")", 1)[1].split()[1])
    except (IndexError, ValueError):
        return 0


def leftover_processes(marks: TestMarks) -> list[int]:
    """This test's kernels (by their tag) and launchers (by their kernel, or as the
    parent of a tagged kernel), still running."""
    tagged = f"{TAG_VARIABLE}={marks.tag}".encode()
    kernels = {  # (a daemon this test restarted inherits the tag too: not a kernel)
        pid
        for pid in _pids()
        if pid != os.getpid()
        and KERNEL_MARK in _read(f"/proc/{pid}/cmdline")
        and tagged in _read(f"/proc/{pid}/environ")
    }
    launchers = set()
    for pid in _pids():
        if LAUNCHER_MARK not in _read(f"/proc/{pid}/cmdline"):
            continue
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            cwd = ""
        if marks.owns_dir(Path(cwd.removesuffix(" (deleted)")).name):
            launchers.add(pid)
    launchers |= {_parent(pid) for pid in kernels} & set(_pids())
    return sorted(kernels | {pid for pid in launchers if pid > 1})


def leftover_dirs(marks: TestMarks) -> list[str]:
    found = Path(tempfile.gettempdir()).glob(RUNTIME_DIR_PREFIX + "*")
    return sorted(str(path) for path in found if marks.owns_dir(path.name))


def own_listeners() -> set[int]:
    """127.0.0.1 ports this process listens on."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    return {
        port
        for address, port, inode in _listeners_with_inodes()
        if address == LOOPBACK and inode in inodes
    }


def _listeners_with_inodes() -> list[tuple[str, int, str]]:
    found = []
    for line in _read("/proc/net/tcp").decode().splitlines()[1:]:
        fields = line.split()
        if len(fields) > 9 and fields[3] == "0A":  # LISTEN
            address, _, port = fields[1].partition(":")
            found.append((address, int(port, 16), fields[9]))
    return found


def launchers_under(daemon_pid: int) -> set[int]:
    """This package's launchers that run below one sshd (a rig host of this test or
    this worker): not the launchers of another worker, or of a developer's own host."""
    found = set()
    for pid in _pids():
        if LAUNCHER_MARK not in _read(f"/proc/{pid}/cmdline"):
            continue
        ancestor = pid
        while ancestor > 1:
            ancestor = _parent(ancestor)
            if ancestor == daemon_pid:
                found.add(pid)
                break
    return found
