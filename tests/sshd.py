"""The sshd rig for tests: throwaway hosts plus a second, unprivileged login user."""

from __future__ import annotations

import fcntl
import os
import pwd
import secrets
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
    "hold_test_user",
    "release_test_user",
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


# Test sessions on this machine (other checkouts', a developer's) share the user: each
# session that uses it holds a file named by its pid here, and the last one out removes
# the user.  Taken and given back under one lock.
_USER_HOLDERS = Path("/run/ssh-provisioner-tests/user-holders")


@contextmanager
def _holders_locked() -> Iterator[Path]:
    _USER_HOLDERS.mkdir(parents=True, exist_ok=True)
    with open(_USER_HOLDERS.parent / "lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield _USER_HOLDERS


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def hold_test_user() -> str:
    """Create the unprivileged login user if missing, and hold it for this session."""
    with _holders_locked() as holders:
        (holders / str(os.getpid())).touch()
        if not test_user_exists():
            subprocess.run(["useradd", "-m", "-s", "/bin/bash", TEST_USER], check=True)
            # With UsePAM no, sshd refuses a '!'-locked account; '*' only forbids passwords.
            subprocess.run(["usermod", "-p", "*", TEST_USER], check=True)
    return TEST_USER


def release_test_user() -> None:
    """This session is done with the user: the last session out removes it."""
    with _holders_locked() as holders:
        (holders / str(os.getpid())).unlink(missing_ok=True)
        others = [p for p in holders.iterdir() if p.name.isdigit() and _pid_alive(int(p.name))]
        if not others and test_user_exists():
            subprocess.run(["pkill", "-KILL", "-u", TEST_USER], check=False)
            subprocess.run(["userdel", "-r", TEST_USER], check=False, capture_output=True)
        for gone in set(holders.iterdir()) - set(others):
            gone.unlink(missing_ok=True)


def test_user_exists() -> bool:
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        return False
    return True


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
