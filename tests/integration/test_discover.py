"""What a host can run, found for you: `discover` lists a host's kernelspecs (an
IRkernel-style one, a Python one using {connection_file}) and its environments with
ipykernel; `install --from-host` writes kernelspecs for them; `remote_kernel` is read on
the host at each start; the doctor checks it is there."""

from __future__ import annotations

import json
import shutil
import site
import subprocess
import sys
from pathlib import Path
from typing import Any

import ipykernel
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

from ssh_provisioner.errors import LaunchError

from ..conftest import connect_options
from ..helpers import execute
from ..kit import cli, option_args
from ..sshd import SSHDaemon

pytestmark = [pytest.mark.sshd, pytest.mark.usefixtures("no_leaks")]

# A kernel for another language, as IRkernel is one: its own program, its own kernelspec.
FAKE_R = """
import os
from ipykernel.kernelapp import IPKernelApp
from ipykernel.kernelbase import Kernel


class FakeR(Kernel):
    implementation = "fake-r"
    implementation_version = "1.0"
    language_info = {"name": "R", "mimetype": "text/x-r-source", "file_extension": ".r"}
    banner = "a fake R kernel"

    async def do_execute(self, code, silent, store_history=True, user_expressions=None,
                         allow_stdin=False, **kwargs):
        text = "[1] %s %s\\n" % (code.strip(), os.environ.get("FAKE_R_GREETING", ""))
        self.send_response(self.iopub_socket, "stream", {"name": "stdout", "text": text})
        return {"status": "ok", "execution_count": self.execution_count, "payload": [],
                "user_expressions": {}}


IPKernelApp.launch_instance(kernel_class=FakeR)
"""


def make_env(prefix: Path, with_ipykernel: bool = True) -> Path:
    """A venv whose site-packages has ipykernel (and reaches its dependencies)."""
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", "--symlinks", str(prefix)],
        check=True,
        timeout=60,
    )
    packages = next(prefix.glob("lib/python3.*/site-packages"))
    if with_ipykernel:
        (packages / "ipykernel").symlink_to(Path(ipykernel.__file__).parent)
        (packages / "rig.pth").write_text(site.getsitepackages()[0] + "\n")
    return prefix / "bin" / "python"


def write_kernelspec(directory: Path, spec: dict[str, Any]) -> None:
    directory.mkdir(parents=True)
    (directory / "kernel.json").write_text(json.dumps(spec))


@pytest.fixture
def host_kernels(tmp_path: Path) -> Path:
    """Folders of environments on the host: torch-env (ipykernel, no kernelspec),
    data-env (ipykernel, and two kernelspecs installed into it: a fake R one and a
    Python one), and bare-env (no ipykernel)."""
    envs = tmp_path / "envs"
    make_env(envs / "torch-env")
    data_python = make_env(envs / "data-env")
    make_env(envs / "bare-env", with_ipykernel=False)
    kernels = envs / "data-env" / "share" / "jupyter" / "kernels"
    script = envs / "data-env" / "fake_r.py"
    script.write_text(FAKE_R)
    write_kernelspec(
        kernels / "fake-r",
        {"argv": [str(data_python), str(script), "-f", "{connection_file}"],
         "display_name": "R (fake)", "language": "R", "env": {"FAKE_R_GREETING": "hello"}},
    )  # fmt: skip
    write_kernelspec(
        kernels / "py-data",
        {"argv": [str(data_python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
         "display_name": "Python (data)", "language": "python"},
    )  # fmt: skip
    return envs


async def test_discover_install_and_run_what_a_host_has(
    host_a: SSHDaemon, client_key: tuple[Path, str], tmp_path: Path, host_kernels: Path
) -> None:
    destination = host_a.destination("root")
    where = ["--python", sys.executable, "--search", str(host_kernels)]
    options = option_args(connect_options(host_a, client_key[0]))
    env = {"JUPYTER_PATH": str(tmp_path / "share" / "jupyter")}

    listed = cli("discover", destination, *where, "--json", *options)
    assert listed.returncode == 0, listed.stderr
    ours = {k["name"]: k for k in json.loads(listed.stdout) if str(host_kernels) in k["path"]}
    assert set(ours) == {"fake-r", "py-data", "torch-env"}  # not bare-env, nor data-env
    assert ours["fake-r"]["kind"] == "kernelspec"
    assert ours["fake-r"]["language"] == "R"
    assert ours["py-data"]["argv"][-1] == "{connection_file}"
    assert ours["torch-env"]["kind"] == "venv"
    assert ours["torch-env"]["version"] == f"{sys.version_info[0]}.{sys.version_info[1]}"
    table = cli("discover", destination, *where, *options)
    assert "fake-r" in table.stdout
    assert "torch-env" in table.stdout

    installed = cli(
        "install", "--from-host", destination, *where, "--kernel", "fake-r",
        "--kernel", "torch-env", "--prefix", str(tmp_path), *options, env=env,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "share" / "jupyter" / "kernels")])
    specs = ksm.find_kernel_specs()
    fake_r = next(name for name in specs if name.startswith("fake-r-"))
    torch = next(name for name in specs if name.startswith("torch-env-"))
    spec = ksm.get_kernel_spec(fake_r)
    assert spec.display_name == f"R (fake) ({destination})"
    assert spec.language == "R"
    assert spec.metadata["kernel_provisioner"]["config"]["remote_kernel"] == "fake-r"

    km = AsyncKernelManager(kernel_name=fake_r, kernel_spec_manager=ksm)
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=30)
        out, _ = await execute(kc, "x <- 1")
        assert out == "[1] x <- 1 hello\n"
        # changed on the host: the next start reads it, no reinstall
        spec_file = host_kernels / "data-env/share/jupyter/kernels/fake-r/kernel.json"
        changed = json.loads(spec_file.read_text())
        changed["env"]["FAKE_R_GREETING"] = "changed"
        spec_file.write_text(json.dumps(changed))
        await km.restart_kernel()
        await kc.wait_for_ready(timeout=30)
        out, _ = await execute(kc, "y <- 2")
        assert out == "[1] y <- 2 changed\n"
    finally:
        kc.stop_channels()
        await km.shutdown_kernel()

    km = AsyncKernelManager(kernel_name=torch, kernel_spec_manager=ksm)
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=30)
        out, _ = await execute(kc, "import sys; print(sys.prefix)")
        assert out.strip() == str(host_kernels / "torch-env")
    finally:
        kc.stop_channels()
        await km.shutdown_kernel()

    checked = cli("check", fake_r, "--json", env=env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    kernel = json.loads(checked.stdout)[0]["checks"]["kernel"]
    assert kernel["status"] == "ok"
    assert kernel["detail"].startswith("the host's kernelspec 'fake-r' (R, ")
    shutil.move(host_kernels / "data-env/share/jupyter/kernels/fake-r", tmp_path / "moved")
    checked = cli("check", fake_r, env=env)
    assert checked.returncode == 1
    assert "no kernelspec 'fake-r' on the host (remote_kernel); it has: " in checked.stdout
    km = AsyncKernelManager(kernel_name=fake_r, kernel_spec_manager=ksm)
    with pytest.raises(LaunchError, match="no kernelspec 'fake-r' on this host"):
        await km.start_kernel()
    assert not km.has_kernel
