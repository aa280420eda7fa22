"""The sshd rig for tests: throwaway hosts plus a second, unprivileged login user."""

from __future__ import annotations

import os
import pwd
import secrets
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

from ssh_provisioner.throwaway import (
    SSHDaemon,
    SSHDUnavailable,
    free_port,
    generate_key,
    running_sshd,
    sshd_missing_reason,
    start_sshd,
)

__all__ = [
    "TEST_USER",
    "SSHDUnavailable",
    "SSHDaemon",
    "free_port",
    "generate_key",
    "running_sshd",
    "sshd_unavailable_reason",
    "start_sshd",
    "temporary_user",
]

TEST_USER = "sshp-test"


def sshd_unavailable_reason() -> str | None:
    reason = sshd_missing_reason()
    if reason is None and os.geteuid() != 0:
        reason = "the sshd tests run as root (they log in as root and as a second user)"
    return reason


def ensure_test_user() -> tuple[str, bool]:
    """Create the unprivileged login user if missing; returns (name, created)."""
    try:
        pwd.getpwnam(TEST_USER)
        return TEST_USER, False
    except KeyError:
        pass
    subprocess.run(["useradd", "-m", "-s", "/bin/bash", TEST_USER], check=True)
    # With UsePAM no, sshd refuses a '!'-locked account; '*' only forbids passwords.
    subprocess.run(["usermod", "-p", "*", TEST_USER], check=True)
    return TEST_USER, True


@contextmanager
def temporary_user(prefix: str) -> Iterator[str]:
    """A login user of its own for one test (its home, its shell's start-up files),
    removed with its processes afterwards."""
    name = f"{prefix}-{secrets.token_hex(3)}"
    subprocess.run(["useradd", "-m", "-s", "/bin/bash", name], check=True)
    try:
        subprocess.run(["usermod", "-p", "*", name], check=True)
        yield name
    finally:
        subprocess.run(["pkill", "-KILL", "-u", name], check=False)
        subprocess.run(["userdel", "-r", name], check=False, capture_output=True)


def remove_test_user() -> None:
    subprocess.run(["pkill", "-KILL", "-u", TEST_USER], check=False)
    subprocess.run(["userdel", "-r", TEST_USER], check=False, capture_output=True)


def user_can_run_kernel(user: str, python: str) -> str | None:
    """None if ``user`` can run ``python -m ipykernel``; otherwise the reason."""
    result = subprocess.run(
        ["runuser", "-u", user, "--", python, "-c", "import ipykernel"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if result.returncode == 0:
        return None
    return (
        f"user {user} cannot run {python} with ipykernel ({result.stderr.strip()[-300:]}); "
        f"build the venv with .ci/setup in a directory other users can read"
    )
