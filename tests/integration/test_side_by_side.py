"""The suite beside other kernels of this package: a developer's own remote kernel, or
another checkout's tests, running on the same machine do not fail it (a test judges
only what it created: tests/leaks.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ..conftest import KernelSpecFactory, rig_config
from ..leaks import TAG_VARIABLE
from ..sshd import SSHDaemon

pytestmark = [pytest.mark.sshd, pytest.mark.usefixtures("no_leaks")]

# Another process's kernel, as a developer's own Jupyter would hold it: started, then
# kept until its stdin closes, then shut down.
UNRELATED_KERNEL = """
import asyncio, sys
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

async def main():
    ksm = KernelSpecManager(kernel_dirs=[sys.argv[1]])
    km = AsyncKernelManager(kernel_name=sys.argv[2], kernel_spec_manager=ksm)
    await km.start_kernel()
    print("up", flush=True)
    await asyncio.to_thread(sys.stdin.read)
    await km.shutdown_kernel(now=True)

asyncio.run(main())
"""

ROOT = Path(__file__).resolve().parents[2]
INNER_TESTS = [
    "tests/integration/test_lifecycle.py::test_kernel_runs_under_ssh_as_the_login_user",
    "tests/integration/test_lifecycle.py::test_shutdown_leaves_nothing_on_either_side",
    "tests/integration/test_lifecycle.py::test_restart_gives_a_new_process_and_ends_the_old",
]


def test_the_suite_passes_beside_an_unrelated_kernel(
    make_kernelspec: KernelSpecFactory,
    host_a: SSHDaemon,
    client_key: tuple[Path, str],
    tmp_path: Path,
) -> None:
    config: dict[str, Any] = rig_config(host_a, client_key[0])
    _, name = make_kernelspec(config)
    kernels = str(tmp_path / "kernels")
    env = {key: value for key, value in os.environ.items() if key != TAG_VARIABLE}
    with subprocess.Popen(
        [sys.executable, "-c", UNRELATED_KERNEL, kernels, name],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
    ) as other:  # fmt: skip
        assert other.stdin is not None
        assert other.stdout is not None
        try:
            assert other.stdout.readline().strip() == "up"
            inner = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
                 *INNER_TESTS],
                capture_output=True, text=True, cwd=ROOT, env=env, timeout=600, check=False,
            )  # fmt: skip
            assert inner.returncode == 0, inner.stdout[-3000:] + inner.stderr[-2000:]
            assert other.poll() is None  # the unrelated kernel's process is untouched
        finally:
            other.stdin.close()
            other.wait(timeout=60)
    assert other.returncode == 0
