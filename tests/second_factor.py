"""A real second factor for tests: sshd with PAM's OATH module asks for a one-time code
after the key (AuthenticationMethods publickey,keyboard-interactive), and the user's
own OpenSSH master, opened the way a user opens it (`ssh -fN HOST`, the code typed once:
here through SSH_ASKPASS)."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .sshd import SSHDaemon, start_sshd

PROMPT = "One-time password"
ACCEPTED = "Accepted keyboard-interactive/pam for root"
MFA_SSHD_CONFIG = [
    "UsePAM yes",
    "KbdInteractiveAuthentication yes",
    "PermitRootLogin yes",
    "AuthenticationMethods publickey,keyboard-interactive",
]


def pam_oath_module() -> str:
    for pattern in ("/usr/lib/*/security/pam_oath.so", "/lib/*/security/pam_oath.so"):
        found = sorted(Path("/").glob(pattern.lstrip("/")))
        if found:
            return str(found[0])
    pytest.fail("libpam-oath is missing: .ci/setup installs it")


class SecondFactor:
    """An HOTP token: the server's users file, and a code generator for the client
    (a script that prints the next code; codes it gave are kept to look for in logs)."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        seed = secrets.token_hex(20)
        (directory / "seed").write_text(seed)
        (directory / "seed").chmod(0o600)
        self.users = directory / "users.oath"
        self.users.write_text(f"HOTP root - {seed}\n")
        self.users.chmod(0o600)
        (directory / "counter").write_text("0")
        self.codes = directory / "codes"
        self.generator = directory / "next-code"
        self.generator.write_text(
            "#!/bin/sh\nset -e\ncd " + str(directory) + "\n"
            "n=$(cat counter); echo $((n + 1)) > counter\n"
            'code=$(oathtool --hotp -c "$n" - < seed)\n'
            'echo "$code" >> codes\necho "$code"\n'
        )
        self.generator.chmod(0o700)
        self.pam = directory / "pam-sshd"
        self.pam.write_text(
            f"auth requisite {pam_oath_module()} usersfile={self.users} window=20 digits=6\n"
            "account required pam_permit.so\nsession required pam_permit.so\n"
        )

    def codes_given(self) -> list[str]:
        return self.codes.read_text().split() if self.codes.exists() else []


@pytest.fixture
def second_factor_host(
    tmp_path: Path, client_key: tuple[Path, str]
) -> Iterator[tuple[SSHDaemon, SecondFactor]]:
    if shutil.which("oathtool") is None:
        pytest.fail("oathtool is missing: .ci/setup installs it")
    factor = SecondFactor(tmp_path / "factor")
    daemon = start_sshd(
        tmp_path / "mfa-host",
        "127.0.0.12",
        client_key[1] + "\n",
        bind_mounts={"/etc/pam.d/sshd": factor.pam},
        extra_config=MFA_SSHD_CONFIG,
        max_sessions=10,  # OpenSSH's default, as on a real login node
    )
    try:
        yield daemon, factor
    finally:
        daemon.stop()


class Master:
    """The user's OpenSSH master for ``daemon``, as ``ssh -F CONFIG -fN ALIAS`` opens it:
    the one-time code comes from ``factor`` through SSH_ASKPASS, as a user would type it."""

    def __init__(
        self,
        directory: Path,
        daemon: SSHDaemon,
        key: Path,
        factor: SecondFactor,
        alias: str,
        extra: tuple[str, ...] = (),
        control_path: str | None = None,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.alias = alias
        self.factor = factor
        # Short: a Unix socket's path has at most 107 bytes (as users' ~/.ssh/cm-%C)
        self.control_dir = Path(tempfile.mkdtemp(prefix="sshp-cm-"))
        self.config = directory / "ssh_config"
        self.config.write_text(
            f"Host {alias}\n"
            f"  HostName {daemon.address}\n"
            f"  Port {daemon.port}\n"
            "  User root\n"
            f"  IdentityFile {key}\n"
            "  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {daemon.known_hosts}\n"
            "  StrictHostKeyChecking yes\n"
            "  ControlMaster auto\n"
            f"  ControlPath {control_path or f'{self.control_dir}/%C'}\n"
            "  ControlPersist no\n" + "".join(f"  {line}\n" for line in extra)
        )
        self.pids: list[int] = []

    def ssh(self, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
        environment = dict(
            os.environ,
            SSH_ASKPASS=str(self.factor.generator),
            SSH_ASKPASS_REQUIRE="force",
            DISPLAY=":0",
        )
        return subprocess.run(
            ["ssh", "-F", str(self.config), *args],
            env=environment,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            start_new_session=True,  # no terminal: the code comes from SSH_ASKPASS
            check=False,
        )

    def open(self) -> int:
        opened = self.ssh("-fN", self.alias)
        assert opened.returncode == 0, opened.stderr
        pid = self.pid()
        assert pid is not None, "the master does not answer ssh -O check"
        self.pids.append(pid)
        return pid

    def pid(self) -> int | None:
        # A master that is going away can accept the control connection and then close
        # it unanswered ("master hello exchange failed"); ssh then falls back to
        # connecting to the host itself, which hangs on a cut link.  No proxy can be
        # reached that way, so that fallback fails at once and the answer is "gone".
        checked = self.ssh("-o", "ProxyCommand=false", "-O", "check", self.alias)
        found = re.search(r"pid=(\d+)", checked.stderr)
        return int(found.group(1)) if checked.returncode == 0 and found else None

    def control_path(self) -> str:
        printed = self.ssh("-G", self.alias).stdout
        return next(
            line.split(" ", 1)[1]
            for line in printed.splitlines()
            if line.startswith("controlpath ")
        )

    def kill(self) -> None:
        """The master dies (killed, its ControlPersist expired, its link lost)."""
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.pids.clear()

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.control_dir, ignore_errors=True)
