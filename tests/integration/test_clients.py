"""Every jupyter_client manager and the common clients, as users run them: the sync
KernelManager, start_new_kernel / run_kernel, an asyncio.run() script, and the CLIs
(jupyter console in a pty, jupyter run, nbconvert, papermill, jupyter kernel) as real
processes.  Each runs code on a host with a hostname of its own, and leaves nothing
there, nor an SSH connection once the pool's idle timeout has passed."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import nbformat
import pytest
from jupyter_client.blocking import BlockingKernelClient
from jupyter_client.manager import KernelManager, run_kernel, start_new_kernel

from ssh_provisioner.engine import get_engine

from ..conftest import KernelSpecFactory
from ..helpers import SLEEPING_CELL
from ..kit import VENV_BIN, cli_env
from ..sshd import SSHDaemon

pytestmark = [pytest.mark.sshd, pytest.mark.usefixtures("no_leaks")]

HOSTNAME = "host-a"  # the first trio host's own (UTS namespace) hostname
WHERE = "import socket; print('on', socket.gethostname())"
IDLE_TIMEOUT = 1.0
KEEPALIVE = 5.0


@pytest.fixture
def one_host(
    trio: list[SSHDaemon], trio_config: dict[str, Any], make_kernelspec: KernelSpecFactory
) -> tuple[Any, str, SSHDaemon]:
    """(kernelspec manager, kernel name, daemon) for a kernel on host-a."""
    config = {**trio_config, "hosts": trio_config["hosts"][:1]}
    config["pool_idle_timeout"] = IDLE_TIMEOUT
    ksm, name = make_kernelspec(config)
    return ksm, name, trio[0]


def ssh_connections(daemon: SSHDaemon) -> int:
    """Established TCP connections from this machine to the daemon."""
    port = f"{daemon.port:04X}"
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "01" and fields[2].endswith(":" + port):
                count += 1
    return count


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def no_connection_after_idle(daemon: SSHDaemon) -> None:
    wait_for(lambda: ssh_connections(daemon) == 0, IDLE_TIMEOUT + 10, "the idle connection to go")


def run_cli(argv: list[str], ksm: Any, timeout: float = 120, **kwargs: Any) -> str:
    result = subprocess.run(
        argv,
        env=cli_env(ksm),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kwargs,
    )
    assert result.returncode == 0, f"{argv[0]} failed: {result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def blocking_execute(kc: BlockingKernelClient, code: str, timeout: float = 30) -> str:
    chunks: list[str] = []

    def on_output(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "stream":
            chunks.append(msg["content"]["text"])

    reply = kc.execute_interactive(code, output_hook=on_output, timeout=timeout)
    assert reply["content"]["status"] in ("ok", "error")
    return "".join(chunks)


# -- in this process --------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_sync_kernel_manager_and_blocking_client(
    trio: list[SSHDaemon], trio_config: dict[str, Any], make_kernelspec: KernelSpecFactory
) -> None:
    """The whole life through the sync API, with a silence in the middle longer than
    the launcher waits before it counts its client gone and ends an orphan: no call into
    jupyter_client, so nothing but the engine keeps the kernel's link alive."""
    daemon = trio[0]
    config = {
        **trio_config,
        "hosts": trio_config["hosts"][:1],
        "pool_idle_timeout": IDLE_TIMEOUT,
        "keepalive_interval": KEEPALIVE,  # the launcher's liveness_timeout is 4 of these
    }
    silence = KEEPALIVE * 4 + config["orphan_timeout"] + 10
    ksm, name = make_kernelspec(config)
    km = KernelManager(kernel_name=name, kernel_spec_manager=ksm)
    km.shutdown_wait_time = 4.0
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=30)
        assert blocking_execute(kc, WHERE).strip() == f"on {HOSTNAME}"
        msg_id = kc.execute(SLEEPING_CELL)
        while not (
            (m := kc.get_iopub_msg(timeout=30))["msg_type"] == "stream"
            and m["parent_header"].get("msg_id") == msg_id
        ):
            pass
        km.interrupt_kernel()
        assert kc.get_shell_msg(timeout=10)["content"]["ename"] == "KeyboardInterrupt"
        km.restart_kernel()
        kc.wait_for_ready(timeout=30)
        assert blocking_execute(kc, "x = 6 * 7; print(x)").strip() == "42"
        time.sleep(silence)  # the point of the test: a client that says nothing that long
        assert blocking_execute(kc, "print(x)").strip() == "42"
        assert km.is_alive()
    finally:
        kc.stop_channels()
        km.shutdown_kernel()
    assert not km.is_alive()
    no_connection_after_idle(daemon)
    assert get_engine().pool.open_connections == 0


def test_start_new_kernel_and_run_kernel(
    one_host: tuple[Any, str, SSHDaemon], monkeypatch: pytest.MonkeyPatch
) -> None:
    ksm, name, daemon = one_host
    # these helpers take only a kernel name: the kernelspec is found as users install it
    monkeypatch.setenv("JUPYTER_PATH", str(Path(ksm.kernel_dirs[0]).parent))
    km, kc = start_new_kernel(kernel_name=name, startup_timeout=60)
    try:
        assert blocking_execute(kc, WHERE).strip() == f"on {HOSTNAME}"
    finally:
        kc.stop_channels()
        km.shutdown_kernel()
    with run_kernel(kernel_name=name, startup_timeout=60) as kc:
        assert blocking_execute(kc, WHERE).strip() == f"on {HOSTNAME}"
    no_connection_after_idle(daemon)


ASYNC_SCRIPT = """
import asyncio, sys
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

async def main():
    ksm = KernelSpecManager(kernel_dirs=[sys.argv[1]])
    km = AsyncKernelManager(kernel_name=sys.argv[2], kernel_spec_manager=ksm)
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    await kc.wait_for_ready(timeout=30)
    reply = await kc.execute_interactive(
        "import socket; print('on', socket.gethostname())", timeout=30
    )
    assert reply["content"]["status"] == "ok"
    kc.stop_channels()
    await km.shutdown_kernel()
    print("done")

asyncio.run(main())
"""


def test_an_asyncio_run_script_leaves_nothing(one_host: tuple[Any, str, SSHDaemon]) -> None:
    """After asyncio.run() returns the process exits at once (the engine's thread is a
    daemon, closed at exit), and nothing stays on the host or here."""
    ksm, name, daemon = one_host
    started = time.monotonic()
    out = run_cli([sys.executable, "-c", ASYNC_SCRIPT, ksm.kernel_dirs[0], name], ksm, timeout=60)
    assert f"on {HOSTNAME}" in out
    assert "done" in out
    assert time.monotonic() - started < 30
    assert ssh_connections(daemon) == 0  # the process closed its connection at exit


# -- the command-line clients -------------------------------------------------------------


ANSI_ESCAPE = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|[@-Z\\-_])")


class Terminal:
    """A program in a pseudo-terminal, read and typed into like a user would."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.master, slave = pty.openpty()
        self.process = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True
        )
        os.close(slave)
        self.screen = ""  # what it printed, terminal escapes removed

    def expect(self, pattern: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.screen):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{pattern!r} did not appear; the screen:\n{self.screen}")
            ready, _, _ = select.select([self.master], [], [], remaining)
            if ready:
                try:
                    data = os.read(self.master, 65536).decode(errors="replace")
                except OSError:  # the program closed the terminal
                    break
                self.screen += ANSI_ESCAPE.sub("", data)
        if not re.search(pattern, self.screen):
            raise AssertionError(f"{pattern!r} did not appear; the screen:\n{self.screen}")
        return self.screen

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def close(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            os.close(self.master)


def test_jupyter_console_in_a_terminal(one_host: tuple[Any, str, SSHDaemon]) -> None:
    ksm, name, daemon = one_host
    env = {**cli_env(ksm), "TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1"}
    terminal = Terminal([f"{VENV_BIN}/jupyter-console", f"--kernel={name}"], env)
    try:
        terminal.expect(r"In \[1\]", 60)
        terminal.type("print(6*7)\r")
        terminal.expect(r"\b42\b", 30)
        terminal.type(WHERE + "\r")
        terminal.expect(f"on {HOSTNAME}", 30)
        terminal.type("exit\r")
        assert terminal.close(30) == 0
    finally:
        if terminal.process.poll() is None:
            terminal.close(0)
    assert ssh_connections(daemon) == 0


def test_jupyter_run(one_host: tuple[Any, str, SSHDaemon], tmp_path: Path) -> None:
    ksm, name, daemon = one_host
    script = tmp_path / "where.py"
    script.write_text(WHERE + "\nprint(6 * 7)\n")
    out = run_cli([f"{VENV_BIN}/jupyter-run", f"--kernel={name}", str(script)], ksm)
    assert f"on {HOSTNAME}" in out
    assert "42" in out
    assert ssh_connections(daemon) == 0


def notebook(path: Path, name: str, *cells: str, parameters: str | None = None) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": name, "language": "python", "display_name": name}
    nb.metadata["language_info"] = {"name": "python"}
    if parameters is not None:
        cell = nbformat.v4.new_code_cell(parameters)
        cell.metadata["tags"] = ["parameters"]
        nb.cells.append(cell)
    nb.cells += [nbformat.v4.new_code_cell(source) for source in cells]
    nbformat.write(nb, path)
    return path


def stdout_of(path: Path) -> str:
    nb = nbformat.read(path, as_version=4)
    return "".join(
        output.get("text", "")
        for cell in nb.cells
        for output in cell.get("outputs", [])
        if output.get("name") == "stdout"
    )


def test_nbconvert_executes_a_notebook(
    one_host: tuple[Any, str, SSHDaemon], tmp_path: Path
) -> None:
    ksm, name, daemon = one_host
    source = notebook(tmp_path / "in.ipynb", name, WHERE, "print(6 * 7)")
    run_cli(
        [
            f"{VENV_BIN}/jupyter-nbconvert",
            "--to=notebook",
            "--execute",
            f"--ExecutePreprocessor.kernel_name={name}",
            "--output=out.ipynb",
            str(source),
        ],
        ksm,
    )
    assert stdout_of(tmp_path / "out.ipynb") == f"on {HOSTNAME}\n42\n"
    assert ssh_connections(daemon) == 0


def test_papermill_with_a_parameter(one_host: tuple[Any, str, SSHDaemon], tmp_path: Path) -> None:
    ksm, name, daemon = one_host
    source = notebook(tmp_path / "in.ipynb", name, WHERE, "print(x * 2)", parameters="x = 1")
    target = tmp_path / "out.ipynb"
    run_cli([f"{VENV_BIN}/papermill", str(source), str(target), "-k", name, "-p", "x", "5"], ksm)
    assert stdout_of(target) == f"on {HOSTNAME}\n10\n"
    assert ssh_connections(daemon) == 0


def test_jupyter_kernel_then_a_client_on_its_connection_file(
    one_host: tuple[Any, str, SSHDaemon],
) -> None:
    """`jupyter kernel` runs the kernel; another process's client connects with the
    connection file it wrote; Ctrl-C shuts everything down."""
    ksm, name, daemon = one_host
    env = cli_env(ksm)
    process = subprocess.Popen(
        [f"{VENV_BIN}/jupyter-kernel", f"--kernel={name}"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        connection_file = None
        deadline = time.monotonic() + 60
        log = ""
        while connection_file is None:
            assert time.monotonic() < deadline, f"no connection file announced:\n{log}"
            line = process.stdout.readline()
            assert line, f"jupyter kernel exited:\n{log}"
            log += line
            found = re.search(r"Connection file: (\S+)", line)
            if found:
                connection_file = found.group(1)
        client = textwrap.dedent(
            """
            import sys
            from jupyter_client.blocking import BlockingKernelClient
            kc = BlockingKernelClient(connection_file=sys.argv[1])
            kc.load_connection_file()
            kc.start_channels()
            kc.wait_for_ready(timeout=30)
            kc.execute_interactive(
                "import socket; print('on', socket.gethostname())", timeout=30
            )
            kc.stop_channels()
            """
        )
        out = run_cli([sys.executable, "-c", client, connection_file], ksm, timeout=60)
        assert f"on {HOSTNAME}" in out
        assert json.loads(Path(connection_file).read_text())["ip"] == "127.0.0.1"
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
    assert ssh_connections(daemon) == 0
