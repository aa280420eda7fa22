"""Throwaway OpenSSH hosts on loopback, for the demo and the test suite.

Each daemon is the real ``/usr/sbin/sshd`` with its own host key, known_hosts and
authorized_keys in a directory of the caller's; nothing here reads or writes
/etc/ssh or anyone's ~/.ssh.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh

SSHD = "/usr/sbin/sshd"
READY_TIMEOUT = 10.0


class SSHDUnavailable(RuntimeError):
    pass


def sshd_missing_reason() -> str | None:
    if not os.path.exists(SSHD):
        return (
            f"{SSHD} is missing: install OpenSSH's server "
            "(Debian/Ubuntu: apt-get install openssh-server)"
        )
    return None


def generate_key(path: Path) -> str:
    """Write a new ed25519 private key at ``path``; return the public key line."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    key.write_private_key(str(path))
    path.chmod(0o600)
    return key.export_public_key().decode().strip()


def free_port(address: str) -> int:
    with socket.socket() as sock:
        sock.bind((address, 0))
        port: int = sock.getsockname()[1]
        return port


def read_banner(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=1.0) as sock:
            return sock.recv(64).startswith(b"SSH-2.0-")
    except OSError:
        return False


@dataclass
class SSHDaemon:
    """One running sshd; ``host_public_key`` is what its clients must trust."""

    address: str
    port: int
    directory: Path
    host_public_key: str
    argv: list[str]
    process: subprocess.Popen[bytes]
    log_path: Path
    known_hosts: Path = field(init=False)

    def __post_init__(self) -> None:
        self.known_hosts = self.directory / "known_hosts"
        self.known_hosts.write_text(self.known_hosts_line() + "\n")

    def known_hosts_line(self, public_key: str | None = None) -> str:
        name = self.address if self.port == 22 else f"[{self.address}]:{self.port}"
        return f"{name} {public_key or self.host_public_key}"

    def destination(self, user: str) -> str:
        return f"{user}@{self.address}:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """Stop the daemon and the sshd processes serving its connections.

        Those run in sessions of their own, so stopping the listener alone would leave
        established connections up; users' processes (kernels) are left alone.  The
        listener is frozen first: a client reconnecting at once (the provisioner does,
        from its engine thread) must not get a new connection, served by a process
        forked after the list of those to kill was taken.
        """
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGSTOP)
        for pid in _sshd_descendants(self.process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # a stopped process dies of it too
        self.process.wait(5)

    def start(self) -> None:
        """(Re)start on the same address, port and host key."""
        if self.process.poll() is None:
            return
        in_netns = self.argv[:3] == ["ip", "netns", "exec"]
        log_from = self.log_path.stat().st_size if in_netns else None
        process = _spawn(self.argv, self.log_path)
        if not _wait_for_banner(
            process, self.address, self.port, log_path=self.log_path, log_from=log_from
        ):
            raise SSHDUnavailable(f"sshd on {self.address}:{self.port} did not restart")
        self.process = process


def _sshd_descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        name, _, rest = stat.partition("(")[2].rpartition(")")
        pid = int(entry)
        names[pid] = name
        children.setdefault(int(rest.split()[1]), []).append(pid)
    found, pending = [], list(children.get(root, []))
    while pending:
        pid = pending.pop()
        if names.get(pid) == "sshd":
            found.append(pid)
            pending.extend(children.get(pid, []))
    return found


def _spawn(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return subprocess.Popen(  # noqa: S603 - fixed binary, argv list
            argv,
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def _wait_for_banner(
    process: subprocess.Popen[bytes],
    address: str,
    port: int,
    *,
    log_path: Path | None = None,
    log_from: int | None = None,
) -> bool:
    """Until sshd answers on address:port; with ``log_from`` (a daemon in a network
    namespace, maybe on an address only reachable there) until its log, from that
    offset on, says it listens."""
    deadline = time.monotonic() + READY_TIMEOUT
    listening = f"Server listening on {address} port {port}.".encode()
    while time.monotonic() < deadline and process.poll() is None:
        if log_from is None and read_banner(address, port):
            return True
        if log_from is not None and log_path is not None:
            with contextlib.suppress(OSError), open(log_path, "rb") as log:
                log.seek(log_from)
                if listening in log.read():
                    return True
        time.sleep(0.02)
    if process.poll() is None:
        process.kill()
    process.wait()
    return False


def start_sshd(
    directory: Path,
    address: str,
    authorized_keys: str,
    *,
    host_key: Path | None = None,
    hostname: str | None = None,
    bind_mounts: dict[str, Path] | None = None,
    set_env: dict[str, str] | None = None,
    netns: str | None = None,
    max_sessions: int = 100,
    extra_config: list[str] | None = None,
) -> SSHDaemon:
    """Start ``/usr/sbin/sshd -D -e -f CONFIG`` on a free port and wait for its banner.

    ``hostname`` and ``bind_mounts`` (target -> source) give the host an identity of
    its own: the daemon, and so every session, runs in new UTS and mount namespaces
    (root only).  ``set_env`` is sshd's SetEnv for every session (PATH, for example).
    ``netns`` runs it in that network namespace (root only), on port 22 of ``address``.
    ``max_sessions`` is sshd's MaxSessions (OpenSSH's default is 10).
    ``extra_config`` lines come first, so they win (sshd keeps an option's first value).
    """
    reason = sshd_missing_reason()
    if reason:
        raise SSHDUnavailable(reason)
    directory.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:  # privilege separation wants it; only root may create it
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    if host_key is None:
        host_key = directory / "host_ed25519"
        public = generate_key(host_key)
    else:
        public = asyncssh.read_private_key(str(host_key)).export_public_key().decode().strip()
    auth = directory / "authorized_keys"
    auth.write_text(authorized_keys)
    auth.chmod(0o644)  # sshd reads it as the login user
    directory.chmod(0o755)
    environment = " ".join(f"{k}={v}" for k, v in (set_env or {}).items())
    last_error = ""
    for _ in range(5):  # Port 0 is refused; a picked port can be taken before bind
        port = 22 if netns else free_port(address)  # a namespace of our own is empty
        config = directory / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    *(extra_config or []),
                    f"Port {port}",
                    f"ListenAddress {address}",
                    f"HostKey {host_key}",
                    f"PidFile {directory / 'sshd.pid'}",
                    f"AuthorizedKeysFile {auth}",
                    "StrictModes no",
                    "UsePAM no",
                    "PermitRootLogin prohibit-password",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "AllowTcpForwarding yes",
                    "AllowStreamLocalForwarding yes",
                    "UseDNS no",
                    "PrintMotd no",
                    f"MaxSessions {max_sessions}",
                    "LogLevel VERBOSE",
                    *([f"SetEnv {environment}"] if environment else []),
                    "",
                ]
            )
        )
        argv = [SSHD, "-D", "-e", "-f", str(config)]
        if hostname or bind_mounts:
            script = [f"hostname {shlex.quote(hostname)}"] if hostname else []
            for target, source in (bind_mounts or {}).items():
                script.append(shlex.join(["mount", "--bind", str(source), target]))
            script.append("exec " + shlex.join(argv))
            argv = [
                "unshare", "--uts", "--mount", "--propagation", "private", "--",
                "/bin/sh", "-c", " && ".join(script),
            ]  # fmt: skip
        if netns:
            argv = ["ip", "netns", "exec", netns, *argv]
        log_path = directory / "sshd.log"
        log_from = log_path.stat().st_size if netns and log_path.exists() else 0
        process = _spawn(argv, log_path)
        if _wait_for_banner(
            process, address, port, log_path=log_path, log_from=log_from if netns else None
        ):
            return SSHDaemon(address, port, directory, public, argv, process, log_path)
        last_error = log_path.read_text(errors="replace")[-2000:]
    raise SSHDUnavailable(f"sshd on {address} did not start:\n{last_error}")


@contextlib.contextmanager
def running_sshd(
    directory: Path, address: str, authorized_keys: str, **kwargs: Any
) -> Iterator[SSHDaemon]:
    daemon = start_sshd(directory, address, authorized_keys, **kwargs)
    try:
        yield daemon
    finally:
        daemon.stop()
