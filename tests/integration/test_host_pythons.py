"""The launcher and a kernel on every host Python the README promises (3.6-3.13), with
tcp and ipc: start, execute, interrupt, restart, shutdown.

The interpreters are pyenv's (``$(pyenv root)/versions/``), each with an ipykernel that
supports it in ``.hostpy/<version>`` (``.ci/host-pythons``).  In CI a missing
interpreter or ipykernel fails the test; it never skips."""

from __future__ import annotations

from pathlib import Path

import pytest

from ..conftest import KernelSpecFactory, connect_options
from ..helpers import execute, interrupt_a_running_cell
from ..kit import HOST_PYTHONS, host_python, running_kernel
from ..sshd import SSHDaemon

pytestmark = [pytest.mark.sshd, pytest.mark.usefixtures("no_leaks")]


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
@pytest.mark.parametrize("minor", HOST_PYTHONS)
async def test_a_kernel_lives_its_whole_life_on_host_python(
    make_kernelspec: KernelSpecFactory,
    host_a: SSHDaemon,
    client_key: tuple[Path, str],
    minor: str,
    transport: str,
) -> None:
    python, site = host_python(minor)
    config = {  # as root: pyenv's interpreters live in root's home
        "hosts": [host_a.destination("root")],
        "connect_options": connect_options(host_a, client_key[0]),
        "remote_python": python,
        "remote_transport": transport,
        "orphan_timeout": 5.0,
    }
    env = {"PYTHONPATH": str(site)}
    async with running_kernel(make_kernelspec, config, env=env) as (km, kc):
        code = "import sys, socket; print('%d.%d' % sys.version_info[:2], socket.gethostname())"
        out, reply = await execute(kc, code)
        assert reply["status"] == "ok", reply
        version, hostname = out.split()
        assert version == minor
        info = await km.provisioner.get_provisioner_info()
        assert hostname == info["hostname"]
        if transport == "ipc":
            assert all(isinstance(e, str) for e in info["endpoints"].values())

        await interrupt_a_running_cell(km, kc)

        await km.restart_kernel()
        await kc.wait_for_ready(timeout=60)
        out, _ = await execute(kc, "import sys; print(sys.version_info[1])")
        assert out.strip() == minor.split(".")[1]
        assert (await km.provisioner.get_provisioner_info())["pid"] != info["pid"]
