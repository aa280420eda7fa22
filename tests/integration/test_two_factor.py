"""A login that demands a real second factor: sshd with PAM's OATH module asks for a
one-time code after the key (AuthenticationMethods publickey,keyboard-interactive).
The provisioner answers the prompt by its kbdint rules, once per pooled connection."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import pytest

from ssh_provisioner import AuthenticationError

from ..conftest import KernelSpecFactory, connect_options
from ..helpers import execute, start_failing
from ..kit import running_kernel
from ..second_factor import ACCEPTED, PROMPT, SecondFactor, second_factor_host
from ..sshd import SSHDaemon

pytestmark = [pytest.mark.sshd, pytest.mark.usefixtures("no_leaks")]

__all__ = ["second_factor_host"]  # a fixture, used by name

REFUSED = "Failed keyboard-interactive/pam for root"


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
