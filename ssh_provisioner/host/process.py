"""Processes, process groups, descriptors and the sockets they listen on (Linux /proc)."""

import os
import re
import socket
import sys
from typing import Any, Dict, List, Optional, Set

DESCRIPTORS_WANTED = 65536  # the launcher raises its soft limit this far


def killpg(pgid: int, signum: int) -> bool:
    try:
        os.killpg(pgid, signum)
    except OSError:  # gone, not ours, or a signal this host does not have
        return False
    return True


def process_tree(root: int) -> Dict[int, int]:
    """pid -> process group of every descendant of ``root``; {} without /proc.

    Walks the tree down from ``root`` by its threads' ``children`` lists (a few reads,
    however many processes the host runs: the port watch does this every second, in
    every launcher); a kernel built without them gets a scan of every process."""
    found = _tree_by_children(root)
    return found if found is not None else _tree_by_scan(root)


def _children(pid: int) -> Optional[List[int]]:
    """``pid``'s children; None if this kernel keeps no children lists."""
    try:
        tasks = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return []  # gone meanwhile
    children: List[int] = []
    for tid in tasks:
        try:
            with open("/proc/%d/task/%s/children" % (pid, tid)) as f:
                children.extend(int(child) for child in f.read().split())
        except FileNotFoundError:
            if not os.path.isdir("/proc/%d/task/%s" % (pid, tid)):
                continue  # the thread ended meanwhile
            return None  # no CONFIG_PROC_CHILDREN
        except (OSError, ValueError):
            continue
    return children


def _tree_by_children(root: int) -> Optional[Dict[int, int]]:
    found: Dict[int, int] = {}
    pending = [root]
    while pending:
        children = _children(pending.pop())
        if children is None:
            return None
        for child in children:
            if child in found:
                continue
            try:
                with open("/proc/%d/stat" % child) as f:
                    found[child] = int(f.read().rpartition(")")[2].split()[2])  # pgid
            except (OSError, ValueError, IndexError):
                continue  # ended meanwhile
            pending.append(child)
    return found


def _tree_by_scan(root: int) -> Dict[int, int]:
    table: Dict[int, List[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return {}
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                fields = f.read().rpartition(")")[2].split()
            table[int(entry)] = [int(fields[1]), int(fields[2])]  # ppid, pgid
        except (OSError, ValueError, IndexError):
            continue
    children: Dict[int, List[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: Dict[int, int] = {}
    pending = [root]
    while pending:
        for child in children.get(pending.pop(), ()):
            if child not in found:
                found[child] = table[child][1]
                pending.append(child)
    return found


def raise_descriptor_limit() -> int:
    """The launcher serves every client connection of its kernel (and whoever else
    connects to its relay): its soft descriptor limit goes up to the hard one (at most
    DESCRIPTORS_WANTED).  Returns the limit now in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = DESCRIPTORS_WANTED if hard == resource.RLIM_INFINITY else min(hard, DESCRIPTORS_WANTED)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    return DESCRIPTORS_WANTED if soft == resource.RLIM_INFINITY else soft


def become_subreaper() -> None:
    """Descendants orphaned by a wrapper that exits (or a kernel that daemonizes) are
    re-parented to this launcher, so they stay in its tree and end with it (Linux)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


ARGV_FIELD = re.compile(r"\{([A-Za-z0-9_]+)\}")


def substitute(arg: str, names: Dict[str, str]) -> str:
    """jupyter_client's rule: only ``{name}`` with a known name is replaced; every other
    brace (``${X:-y}``, ``{}``, ``{x:>8}``) stays as written."""
    return ARGV_FIELD.sub(lambda match: names.get(match.group(1), match.group(0)), arg)


def pick_tcp_ports(count: int) -> List[int]:
    """Let this host's kernel choose free ports: bind them all at once, then release."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def endpoint_listening(transport: str, endpoint: Any) -> bool:
    family = socket.AF_UNIX if transport == "ipc" else socket.AF_INET
    address = endpoint if transport == "ipc" else ("127.0.0.1", endpoint)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(0.5)
        sock.connect(address)
    except OSError:
        return False
    finally:
        sock.close()
    return True


def tcp_listeners(ports: Set[int]) -> Optional[Dict[int, int]]:
    """Port -> socket inode of the IPv4 listeners on ``ports``; None without /proc."""
    try:
        with open("/proc/net/tcp") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return None
    found = {}
    for line in lines:
        fields = line.split()
        if len(fields) < 10 or fields[3] != "0A":  # 0A: LISTEN
            continue
        address, _, port_hex = fields[1].partition(":")
        port = int(port_hex, 16)
        if port in ports and address in ("0100007F", "00000000"):
            found[port] = int(fields[9])
    return found


def unix_listeners(paths: Set[str]) -> Set[int]:
    """Socket inodes of the Unix listeners bound to ``paths``."""
    try:
        with open("/proc/net/unix") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return set()
    found = set()
    for line in lines:
        fields = line.split()
        # Num RefCount Protocol Flags Type St Inode Path; flag 0x10000: listening
        if len(fields) >= 8 and int(fields[3], 16) & 0x10000 and fields[7] in paths:
            found.add(int(fields[6]))
    return found


def socket_inodes(pids: Any) -> Set[int]:
    """Inodes of the sockets that the processes ``pids`` hold open."""
    inodes = set()
    for pid in pids:
        fd_dir = "/proc/%d/fd" % pid
        try:
            for fd in os.listdir(fd_dir):
                link = os.readlink(os.path.join(fd_dir, fd))
                if link.startswith("socket:["):
                    inodes.add(int(link[8:-1]))
        except (OSError, ValueError):
            continue
    return inodes
