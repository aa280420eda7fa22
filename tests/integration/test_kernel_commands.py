"""Kernels as real kernelspecs start them: through wrappers (setsid, env), with braces
in their argv, odd signal numbers, a hostile json.py in the login home, and output that
a line reader would choke on."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ssh_provisioner import ProvisionerConfigError

from ..conftest import KernelSpecFactory, connect_options
from ..helpers import execute, interrupt_a_running_cell, process_alive
from ..kit import running_kernel
from ..sshd import TEST_USER, SSHDaemon

pytestmark = [pytest.mark.sshd, pytest.mark.usefixtures("no_leaks")]

KERNEL = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
SETSID = shutil.which("setsid") or "/usr/bin/setsid"
ENV = shutil.which("env") or "/usr/bin/env"


async def test_a_kernel_behind_setsid_starts_interrupts_and_leaves_nothing(
    make_kernelspec: KernelSpecFactory, host_config: dict[str, Any]
) -> None:
    """`setsid -w` puts the kernel in a session (and process group) of its own: its
    ports are still the launcher's kernel's, and signals still reach it."""
    async with running_kernel(make_kernelspec, host_config, argv=[SETSID, "-w", *KERNEL]) as (
        km,
        kc,
    ):
        out, _ = await execute(kc, "import os; print(os.getsid(0) == os.getpid())")
        assert out.strip() == "True"  # really in a session of its own
        await interrupt_a_running_cell(km, kc)
        out, _ = await execute(kc, "print('still here')")
        assert out.strip() == "still here"
        info = await km.provisioner.get_provisioner_info()
    assert not process_alive(info["pid"])


async def test_braces_in_argv_are_left_as_written_and_env_wraps(
    make_kernelspec: KernelSpecFactory, host_config: dict[str, Any]
) -> None:
    """Only {connection_file} and {resource_dir} are replaced, as jupyter_client does."""
    literal = {
        "SSHP_SHELL_DEFAULT": "${X:-y}",
        "SSHP_POSITIONAL": "${0}",
        "SSHP_EMPTY": "{}",
        "SSHP_FORMAT_SPEC": "{x:>8}",
        "SSHP_UNKNOWN": "{prefix}",
    }
    argv = [ENV, *(f"{name}={value}" for name, value in literal.items()), *KERNEL]
    async with running_kernel(make_kernelspec, host_config, argv=argv) as (_, kc):
        names = sorted(literal)
        code = f"import os, json; print(json.dumps({{k: os.environ[k] for k in {names!r}}}))"
        out, reply = await execute(kc, code)
        assert reply["status"] == "ok"
        assert json.loads(out) == literal


async def test_a_signal_number_that_is_no_signal_is_refused(
    make_kernelspec: KernelSpecFactory, host_config: dict[str, Any]
) -> None:
    async with running_kernel(make_kernelspec, host_config) as (km, kc):
        with pytest.raises(ProvisionerConfigError, match="not a signal number"):
            await km.signal_kernel(250)
        # a real one the kernel ignores by default is delivered, and the kernel lives on
        await km.signal_kernel(signal.SIGWINCH)
        assert await km.is_alive()
        out, _ = await execute(kc, "print('alive')")
        assert out.strip() == "alive"


@pytest.fixture
def hostile_json_in_home(test_user: str) -> Iterator[Path]:
    home = Path(os.path.expanduser(f"~{TEST_USER}"))
    path = home / "json.py"
    path.write_text("raise SystemExit('a json.py in the home directory was imported')\n")
    shutil.chown(path, TEST_USER)
    yield path
    path.unlink(missing_ok=True)


async def test_a_json_py_in_the_login_home_is_not_imported_by_the_launcher(
    make_kernelspec: KernelSpecFactory,
    host_a: SSHDaemon,
    client_key: tuple[Path, str],
    hostile_json_in_home: Path,
) -> None:
    config = {
        "hosts": [host_a.destination(TEST_USER)],
        "connect_options": connect_options(host_a, client_key[0]),
        "remote_python": sys.executable,
        "remote_cwd": "/tmp",  # the kernel's own cwd is elsewhere
    }
    async with running_kernel(make_kernelspec, config) as (_, kc):
        out, _ = await execute(kc, "print('started')")
        assert out.strip() == "started"


async def test_a_4_mib_line_on_stderr_does_not_stall_the_launcher_channel(
    make_kernelspec: KernelSpecFactory, host_config: dict[str, Any]
) -> None:
    async with running_kernel(make_kernelspec, host_config) as (km, kc):
        code = "import os; os.write(2, b'x' * (4 << 20) + b'\\n'); print('written')"
        out, _ = await execute(kc, code, timeout=60)
        assert out.strip() == "written"
        pid = (await km.provisioner.get_provisioner_info())["pid"]
        os.kill(pid, signal.SIGKILL)  # a loopback host: the kernel is our neighbour
        started = time.monotonic()
        status = await asyncio.wait_for(km.provisioner.wait(), 10)
        assert status == -signal.SIGKILL
        assert time.monotonic() - started < 10
