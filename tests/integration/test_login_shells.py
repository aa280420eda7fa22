"""Logins as users have them: a .bashrc that prints (a banner, module or conda chatter)
does not stop a kernel; the launcher's output is told from the shell's, and the doctor
says what the shell prints."""

from __future__ import annotations

import logging
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import KernelSpecFactory, rig_config
from ..helpers import execute
from ..kit import running_kernel
from ..sshd import SSHDaemon, temporary_user

pytestmark = [pytest.mark.sshd, pytest.mark.usefixtures("no_leaks")]

THREE_LINES = "echo 'Welcome to the cluster'\necho 'module: gcc/12 loaded'\necho '(base)'\n"
ONE_MIB = "head -c 1048576 /dev/zero | tr '\\0' '#'\n"  # and no newline at its end


@pytest.mark.parametrize("bashrc", [THREE_LINES, ONE_MIB], ids=["three-lines", "one-mib"])
async def test_a_login_shell_that_prints_does_not_stop_a_kernel(
    make_kernelspec: KernelSpecFactory,
    host_a: SSHDaemon,
    client_key: tuple[Path, str],
    caplog: pytest.LogCaptureFixture,
    bashrc: str,
) -> None:
    caplog.set_level(logging.DEBUG, logger="ssh_provisioner")
    with temporary_user("sshp-chatty") as user:
        home = Path(pwd.getpwnam(user).pw_dir)
        (home / ".bashrc").write_text(bashrc)
        config = rig_config(host_a, client_key[0], user, pool_idle_timeout=0)
        async with running_kernel(make_kernelspec, config) as (km, kc):
            out, _ = await execute(kc, "import getpass; print(getpass.getuser())")
            assert out.strip() == user
            await km.restart_kernel()  # a new launcher, through the same shell
            await kc.wait_for_ready(timeout=30)
            out, _ = await execute(kc, "print('restarted')")
            assert out.strip() == "restarted"
        assert "the login shell printed before the launcher" in caplog.text
        check = subprocess.run(
            [str(Path(sys.executable).parent / "ssh-provisioner"), "check",
             "--host", host_a.destination(user), "--python", sys.executable,
             "--connect-option", f"client_keys=[\"{client_key[0]}\"]",
             "--connect-option", f"known_hosts=\"{host_a.known_hosts}\"",
             "--connect-option", "config=[]", "--connect-option", "agent_path=\"\""],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert check.returncode == 0, check.stdout + check.stderr
        assert "the login shell prints to stdout" in check.stdout
