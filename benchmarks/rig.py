"""What every benchmark stands on: throwaway loopback sshd hosts, one client key, a
known_hosts that lists them, kernelspecs local or remote, and the command line."""

from __future__ import annotations

import argparse
import getpass
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssh_provisioner.throwaway import SSHDaemon, generate_key, running_sshd

ARGV = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]


@dataclass(frozen=True)
class Rig:
    directory: Path
    hosts: list[SSHDaemon]
    login: str
    connect_options: dict[str, Any]

    def config(self, *hosts: SSHDaemon, **options: Any) -> dict[str, Any]:
        """Provisioner config for ``hosts`` (default: the first)."""
        return {
            "hosts": [host.destination(self.login) for host in hosts or self.hosts[:1]],
            "connect_options": self.connect_options,
            "remote_python": sys.executable,
            **options,
        }


@contextmanager
def loopback_hosts(count: int, login: str, max_sessions: int = 100) -> Iterator[Rig]:
    """``count`` sshd daemons on 127.0.0.2, .3, ...; all gone afterwards."""
    with tempfile.TemporaryDirectory(prefix="sshp-bench-") as tmp, ExitStack() as stack:
        directory = Path(tmp)
        directory.chmod(0o755)  # the login user reads the authorized keys below it
        key = directory / "client_ed25519"
        public = generate_key(key)
        hosts = [
            stack.enter_context(
                running_sshd(
                    directory / f"host{i}",
                    f"127.0.0.{i + 2}",
                    public + "\n",
                    max_sessions=max_sessions,
                )
            )
            for i in range(count)
        ]
        known_hosts = directory / "known_hosts"
        known_hosts.write_text("".join(host.known_hosts_line() + "\n" for host in hosts))
        options = {
            "client_keys": [str(key)],
            "known_hosts": str(known_hosts),
            "config": [],
            "agent_path": "",
        }
        yield Rig(directory, hosts, login, options)


@contextmanager
def openssh_master(rig: Rig, host: SSHDaemon, alias: str) -> Iterator[Path]:
    """The user's own OpenSSH master for ``host`` (``ssh -fN ALIAS``), reachable as
    ``alias`` through the ssh config file yielded; stopped afterwards."""
    config = rig.directory / "ssh_config"
    control_dir = Path(tempfile.mkdtemp(prefix="sshp-bench-cm-"))  # a short socket path
    config.write_text(
        f"Host {alias}\n  HostName {host.address}\n  Port {host.port}\n  User {rig.login}\n"
        f"  IdentityFile {rig.connect_options['client_keys'][0]}\n  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {rig.connect_options['known_hosts']}\n"
        "  StrictHostKeyChecking yes\n  BatchMode yes\n  ControlMaster auto\n"
        f"  ControlPath {control_dir}/%C\n  ControlPersist no\n"
    )
    ssh = ["ssh", "-F", str(config)]
    subprocess.run([*ssh, "-fN", alias], check=True, stdin=subprocess.DEVNULL, timeout=30)
    try:
        yield config
    finally:
        subprocess.run([*ssh, "-O", "exit", alias], capture_output=True, check=False, timeout=30)
        shutil.rmtree(control_dir, ignore_errors=True)


def write_kernelspecs(kernels_dir: Path, configs: dict[str, dict[str, Any] | None]) -> None:
    """One kernelspec per name: ssh-provisioner with that config, or local for None."""
    for name, config in configs.items():
        metadata = {}
        if config is not None:
            provisioner = {"provisioner_name": "ssh-provisioner", "config": config}
            metadata["kernel_provisioner"] = provisioner
        directory = kernels_dir / name
        directory.mkdir(parents=True)
        spec = {"argv": ARGV, "display_name": name, "language": "python", "metadata": metadata}
        (directory / "kernel.json").write_text(json.dumps(spec))


def main(doc: str, measure: Callable[[int, str], None]) -> None:
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="measurements per series")
    parser.add_argument("--login", default=getpass.getuser(), help="user to log in as")
    args = parser.parse_args()
    measure(args.rounds, args.login)
