"""The launcher and a kernel on every host Python the README promises (3.6-3.13), with
tcp and ipc: start, execute, interrupt, restart, shutdown.

The interpreters are pyenv's (``$(pyenv root)/versions/``), each with an ipykernel that
supports it in ``.hostpy/<version>`` (``.ci/host-pythons``).  In CI a missing
interpreter or ipykernel fails the test; it never skips."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from ..conftest import IN_CI, KernelSpecFactory, connect_options
from ..helpers import execute, interrupt_a_running_cell
from ..sshd import SSHDaemon
from .test_lifecycle import running_kernel

pytestmark = [pytest.mark.sshd, pytest.mark.usefixtures("no_leaks")]

HOST_PYTHONS = ("3.6", "3.7", "3.8", "3.9", "3.10", "3.11", "3.12", "3.13")
HOSTPY_DIR = Path(__file__).resolve().parents[2] / ".hostpy"


def pyenv_root() -> Path:
    root = os.environ.get("PYENV_ROOT")
    if not root:
        try:
            root = subprocess.run(
                ["pyenv", "root"], capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            root = str(Path.home() / ".pyenv")
    return Path(root)


def host_python(minor: str) -> tuple[str, Path]:
    """(interpreter, its ipykernel dir), or fail (CI) / skip (elsewhere)."""
    versions = sorted(
        pyenv_root().glob(f"versions/{minor}.*/bin/python{minor}"),
        key=lambda p: [int(part) for part in p.parts[-3].split(".") if part.isdigit()],
    )
    site = HOSTPY_DIR / minor
    problem = None
    if not versions:
        problem = f"no Python {minor} under {pyenv_root()}/versions"
    elif not (site / ".done").is_file():
        problem = f"no ipykernel for Python {minor} in {site}: run .ci/host-pythons"
    if problem:
        if IN_CI:
            pytest.fail(problem)
        pytest.skip(problem)
    return str(versions[-1]), site


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
