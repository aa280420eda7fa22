"""The CLI as a user runs it: a subprocess, real sshd, real kernelspec directories."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

from ..conftest import connect_options
from ..helpers import execute, process_alive
from ..kit import BIN, cli, option_args
from ..sshd import SSHDaemon, free_port, generate_key

pytestmark = pytest.mark.sshd


@pytest.fixture
def jupyter_env(tmp_path: Path) -> dict[str, str]:
    return {
        "JUPYTER_PATH": str(tmp_path / "share" / "jupyter"),
        "JUPYTER_DATA_DIR": str(tmp_path / "data"),
    }


@pytest.mark.usefixtures("no_leaks")
async def test_install_list_and_start_a_kernel(
    host_a: SSHDaemon, client_key: tuple[Path, str], tmp_path: Path, jupyter_env: dict[str, str]
) -> None:
    options = connect_options(host_a, client_key[0])
    args = ["install", "gpu-test", "--host", host_a.destination("root"), "--python",
            sys.executable, "--prefix", str(tmp_path), "--env", "GREETING=hello there",
            "--check", "--curve", *option_args(options)]  # fmt: skip
    first = cli(*args, env=jupyter_env)
    assert first.returncode == 0, first.stderr
    assert "Installed kernelspec 'gpu-test'" in first.stdout
    again = cli(*args, env=jupyter_env)
    assert "Replaced kernelspec 'gpu-test'" in again.stdout
    listed = subprocess.run(
        [str(BIN / "jupyter"), "kernelspec", "list", "--json"],
        capture_output=True, text=True, env={**os.environ, **jupyter_env}, check=True,
    )  # fmt: skip
    assert "gpu-test" in json.loads(listed.stdout)["kernelspecs"]
    ours = cli("list", env=jupyter_env)
    assert "gpu-test" in ours.stdout
    assert host_a.destination("root") in ours.stdout

    ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "share" / "jupyter" / "kernels")])
    km = AsyncKernelManager(
        kernel_name="gpu-test", kernel_spec_manager=ksm, transport_encryption="required"
    )
    await km.start_kernel()
    assert km.curve_publickey is not None  # --curve declared it; the channels speak CURVE
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=30)
        out, _ = await execute(
            kc, "import os; print(os.environ['GREETING'], 'SSH_CONNECTION' in os.environ)"
        )
        assert out.strip() == "hello there True"
    finally:
        kc.stop_channels()
        await km.shutdown_kernel()


def test_check_good_down_bad_key_and_changed_key(
    host_a: SSHDaemon, client_key: tuple[Path, str], tmp_path: Path
) -> None:
    good = option_args(connect_options(host_a, client_key[0]))
    python = ["--python", sys.executable]
    ok = cli("check", "--host", host_a.destination("root"), *python, *good, "--json")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    (report,) = json.loads(ok.stdout)
    assert report["ok"] is True
    assert report["checks"]["kernel"]["status"] == "ok"
    assert report["checks"]["kernel"]["detail"].startswith("ipykernel ")
    assert (
        report["checks"]["python"]["detail"].endswith("3.11.2")
        or report["checks"]["python"]["status"] == "ok"
    )

    down = f"root@127.0.0.2:{free_port('127.0.0.2')}"
    stranger = tmp_path / "stranger"
    generate_key(stranger)
    bad_key = option_args(connect_options(host_a, stranger))
    impostor = tmp_path / "known_hosts"
    impostor.write_text(host_a.known_hosts_line(generate_key(tmp_path / "other")) + "\n")
    changed = option_args(connect_options(host_a, client_key[0], known_hosts=str(impostor)))
    cases = [
        ([down, *good], "tcp", "connection refused"),
        ([host_a.destination("root"), *bad_key], "auth", "authentication refused"),
        ([host_a.destination("root"), *changed], "host key", "CHANGED"),
    ]
    for args, failing, words in cases:
        result = cli("check", "--host", *args, *python, "--json")
        assert result.returncode == 1, result.stdout
        (report,) = json.loads(result.stdout)
        assert report["ok"] is False
        assert report["checks"][failing]["status"] == "FAIL"
        assert words in report["checks"][failing]["detail"]
    table = cli("check", "--host", down, *python)
    assert table.returncode == 1
    assert "cannot run kernels" in table.stdout
    assert "Traceback" not in table.stderr


def test_install_check_refuses_when_no_host_works(
    tmp_path: Path, jupyter_env: dict[str, str]
) -> None:
    down = f"root@127.0.0.2:{free_port('127.0.0.2')}"
    result = cli("install", "nope", "--host", down, "--prefix", str(tmp_path), "--check",
                 env=jupyter_env)  # fmt: skip
    assert result.returncode == 1
    assert "not installed" in result.stderr
    assert not (tmp_path / "share" / "jupyter" / "kernels" / "nope").exists()


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["install"],
        ["install", "x", "--host", "bad host"],
        ["install", "x", "--host", "gpu1:99999"],
        ["install", "x", "--host", "h", "--policy", "fastest"],
        ["install", "x", "--host", "h", "--env", "NOEQUALS"],
        ["check"],
        ["frobnicate"],
    ],
)
def test_bad_arguments_one_line_status_2(args: list[str]) -> None:
    result = cli(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_jupyter_subcommand() -> None:
    result = subprocess.run(
        [str(BIN / "jupyter"), "ssh-provisioner", "--help"],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0
    assert "install" in result.stdout


def test_help_shows_examples() -> None:
    for command in ([], ["install"], ["list"], ["check"], ["demo"]):
        result = cli(*command, "--help")
        assert result.returncode == 0
        assert "example" in result.stdout


@pytest.mark.usefixtures("no_leaks")
def test_demo_end_to_end() -> None:
    result = cli("demo", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "SSH_CONNECTION: 127.0.0.1" in result.stdout
    assert "333332833333500000" in result.stdout
    assert "cleaned up" in result.stdout


@pytest.mark.usefixtures("no_leaks")
def test_demo_cleans_up_after_ctrl_c() -> None:
    process = subprocess.Popen(
        [str(BIN / "ssh-provisioner"), "demo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a shell's background job would ignore SIGINT; a terminal's Ctrl-C would not
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert process.stdout is not None
    deadline = time.monotonic() + 60
    line, sshd_pid = "", 0
    while "kernel ready" not in line:  # interrupt while the kernel runs
        assert time.monotonic() < deadline
        line = process.stdout.readline()
        assert line, process.stderr.read() if process.stderr else ""
        if found := re.search(r"\(sshd pid (\d+)\)", line):
            sshd_pid = int(found.group(1))
    # its own temp dir, from its sshd's command line (another demo may run meanwhile)
    config = Path(read_cmdline(sshd_pid).split("-f ", 1)[1].split()[0])
    demo_dir = config.parents[1]
    assert demo_dir.name.startswith("sshp-demo-")
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "interrupted" in stderr
    assert not demo_dir.exists()
    assert not process_alive(sshd_pid)


def read_cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def test_check_knows_non_python_kernels_and_old_pythons(
    host_a: SSHDaemon, client_key: tuple[Path, str], jupyter_env: dict[str, str]
) -> None:
    """`check NAME` checks the kernelspec's own program, not ipykernel, for a kernel that
    is not ipykernel; a Python older than the launcher supports is refused by name."""
    good = option_args(connect_options(host_a, client_key[0]))
    host = ["--host", host_a.destination("root"), "--python", sys.executable]
    for name, argv in [
        ("r-kernel", ["R", "--slave", "-e", "IRkernel::main()", "--args", "{connection_file}"]),
        ("cat-kernel", ["/bin/cat", "{connection_file}"]),
    ]:
        installed = cli(
            "install", name, *host, *good, "--user", "--kernel-argv", *argv, env=jupyter_env
        )
        assert installed.returncode == 0, installed.stderr
    missing = cli("check", "r-kernel", "--json", env=jupyter_env)
    assert missing.returncode == 1
    (report,) = json.loads(missing.stdout)
    assert report["checks"]["kernel"]["status"] == "FAIL"
    assert "'R' is not on the host's PATH" in report["checks"]["kernel"]["detail"]
    present = cli("check", "cat-kernel", "--json", env=jupyter_env)
    assert present.returncode == 0, present.stdout
    (report,) = json.loads(present.stdout)
    assert report["checks"]["kernel"]["detail"] == "/bin/cat at /bin/cat"

    python27 = Path(os.path.expanduser("~/.pyenv/versions/2.7.18/bin/python2.7"))
    if not python27.exists():
        pytest.skip("no Python 2.7 on this machine to play a too-old host Python")
    old = cli(
        "check", "--host", host_a.destination("root"), "--python", str(python27), *good, "--json"
    )
    assert old.returncode == 1
    (report,) = json.loads(old.stdout)
    assert report["checks"]["python"]["status"] == "FAIL"
    assert "Python 2.7.18; the launcher needs 3.6 or newer" in report["checks"]["python"]["detail"]
