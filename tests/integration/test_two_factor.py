"""A login that demands a real second factor: sshd with PAM's OATH module asks for a
one-time code after the key (AuthenticationMethods publickey,keyboard-interactive).
The provisioner answers the prompt by its kbdint rules, once per pooled connection."""

from __future__ import annotations

import logging
import secrets
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ssh_provisioner import AuthenticationError

from ..conftest import KernelSpecFactory, connect_options
from ..helpers import execute, start_failing
from ..sshd import SSHDaemon, start_sshd
from .test_lifecycle import running_kernel

pytestmark = [pytest.mark.sshd, pytest.mark.usefixtures("no_leaks")]

PROMPT = "One-time password"
ACCEPTED = "Accepted keyboard-interactive/pam for root"
REFUSED = "Failed keyboard-interactive/pam for root"


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
        tmp_path / "mfa-host", "127.0.0.12", client_key[1] + "\n",
        bind_mounts={"/etc/pam.d/sshd": factor.pam},
        extra_config=[
            "UsePAM yes", "KbdInteractiveAuthentication yes", "PermitRootLogin yes",
            "AuthenticationMethods publickey,keyboard-interactive",
        ],
    )  # fmt: skip
    try:
        yield daemon, factor
    finally:
        daemon.stop()


def mfa_config(daemon: SSHDaemon, key: Path, **extra: Any) -> dict[str, Any]:
    return {
        "hosts": [daemon.destination("root")],
        "connect_options": connect_options(daemon, key),
        "remote_python": sys.executable,
        "pool_idle_timeout": 0,
        **extra,
    }


async def test_a_code_command_answers_once_per_connection_and_is_never_logged(
    make_kernelspec: KernelSpecFactory,
    second_factor_host: tuple[SSHDaemon, SecondFactor],
    client_key: tuple[Path, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    daemon, factor = second_factor_host
    caplog.set_level(logging.DEBUG)
    config = mfa_config(
        daemon, client_key[0], kbdint=[{"prompt": PROMPT, "command": [str(factor.generator)]}]
    )
    async with (
        running_kernel(make_kernelspec, config) as (_, kc),
        running_kernel(make_kernelspec, config) as (_, kc2),
    ):
        out, _ = await execute(kc, "print(6 * 7)")
        assert out.strip() == "42"
        out, _ = await execute(kc2, "print(7 * 6)")
        assert out.strip() == "42"
    assert daemon.log().count(ACCEPTED) == 1  # two kernels, one pooled connection
    codes = factor.codes_given()
    assert len(codes) == 1
    assert codes[0] not in caplog.text


async def test_a_refused_answer_names_the_prompt_and_is_not_asked_again_at_once(
    make_kernelspec: KernelSpecFactory,
    second_factor_host: tuple[SSHDaemon, SecondFactor],
    client_key: tuple[Path, str],
) -> None:
    daemon, _ = second_factor_host
    config = mfa_config(daemon, client_key[0], kbdint=[f"{PROMPT}=999999x"], host_cooldown=60.0)
    message = await start_failing(make_kernelspec, config, AuthenticationError)
    assert PROMPT in message
    assert "refused" in message
    assert "999999x" not in message
    attempts = daemon.log().count(REFUSED)
    assert attempts >= 1
    again = await start_failing(make_kernelspec, config, AuthenticationError)
    assert PROMPT in again
    assert daemon.log().count(REFUSED) == attempts  # no new prompt within host_cooldown


async def test_without_a_rule_the_error_names_the_prompt(
    make_kernelspec: KernelSpecFactory,
    second_factor_host: tuple[SSHDaemon, SecondFactor],
    client_key: tuple[Path, str],
) -> None:
    daemon, _ = second_factor_host
    message = await start_failing(
        make_kernelspec, mfa_config(daemon, client_key[0]), AuthenticationError
    )
    assert PROMPT in message
    assert "no kbdint rule" in message
    assert daemon.log().count(ACCEPTED) == 0
