"""Security properties: shell-free command construction, secrets, private endpoints,
hostile launcher output, host keys that change."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from ssh_provisioner import HostKeyError, LaunchError, LaunchTimeout
from ssh_provisioner.payload import LAUNCHER_BEGINS

from ..conftest import KernelSpecFactory, rig_config
from ..helpers import execute, start_failing
from ..kit import INTRUDER, running_kernel
from ..sshd import SSHDaemon, generate_key, start_sshd

pytestmark = [pytest.mark.sshd, pytest.mark.usefixtures("no_leaks")]

# Everything a shell would act on; none of it may be acted on.
HOSTILE = "$(touch {m}/1) `touch {m}/2`; touch {m}/3 && 'q' \"dq\" \\ | > {m}/4\nline2 ünïcødé ✓"


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A temp dir the unprivileged login can reach too (pytest's lives under a 0700 dir)."""
    path = Path(tempfile.mkdtemp(prefix="sshp-shared-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def markers(shared_tmp: Path) -> Path:
    directory = shared_tmp / "markers"
    directory.mkdir()
    directory.chmod(0o777)
    return directory


async def test_hostile_text_reaches_the_kernel_verbatim(
    make_kernelspec: KernelSpecFactory,
    host_config: dict[str, Any],
    markers: Path,
    shared_tmp: Path,
) -> None:
    hostile = HOSTILE.format(m=markers)
    cwd = shared_tmp / "cwd $(touch sshp-marker-6) ü"
    cwd.mkdir()
    cwd.chmod(0o777)
    python_dir = shared_tmp / "py $(touch sshp-marker-5) `touch sshp-marker-7` dir"
    python_dir.mkdir()
    python = python_dir / "python"  # a venv's python must not be symlinked away
    python.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    wrapper = (
        "import os, runpy, sys\n"
        "os.environ['ARGV_TAIL'] = sys.argv.pop()\n"
        "sys.argv = ['ipykernel_launcher', *sys.argv[1:]]\n"
        "runpy.run_module('ipykernel_launcher', run_name='__main__')\n"
    )
    config = {
        **host_config,
        "remote_python": str(python),
        "remote_cwd": str(cwd),
        "remote_env": {"HOSTILE_ENV": hostile},
        "forward_env": ["HOSTILE_FORWARDED"],
    }
    argv = ["python3", "{resource_dir}/wrapper.py", "-f", "{connection_file}", hostile]
    async with running_kernel(
        make_kernelspec, config, argv=argv, files={"wrapper.py": wrapper}
    ) as (_, kc):
        out, _ = await execute(
            kc,
            "import os, sys, json; print(json.dumps([os.environ['HOSTILE_ENV'], "
            "os.environ['ARGV_TAIL'], os.getcwd()]))",
        )
        env_value, argv_tail, kernel_cwd = json.loads(out)
    assert env_value == hostile
    assert argv_tail == hostile
    assert kernel_cwd == str(cwd)
    assert sorted(os.listdir(markers)) == []
    for home in ("/root", "/home/sshp-test", str(cwd)):  # where a shell would have run
        assert not list(Path(home).glob("sshp-marker-*"))


async def test_secrets_stay_out_of_command_lines_and_logs(
    make_kernelspec: KernelSpecFactory,
    host_config: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from ..helpers import cmdlines_containing

    caplog.set_level(logging.DEBUG)
    async with running_kernel(make_kernelspec, host_config) as (km, kc):
        key = km.session.key
        await execute(kc, "print('hello')")
        assert cmdlines_containing(key) == []
        await km.restart_kernel()
        await kc.wait_for_ready(timeout=30)
        assert cmdlines_containing(key) == []
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "kernel" in logged  # the capture did see our log lines
    assert key.decode() not in logged


def kernel_tcp_listeners(pid: int) -> set[int]:
    from ssh_provisioner.host.process import process_tree, socket_inodes, tcp_listeners

    owned = socket_inodes([pid, *process_tree(pid)])
    listeners = tcp_listeners(set(range(1, 65536))) or {}
    return {port for port, inode in listeners.items() if inode in owned}


async def test_ipc_channels_are_private_and_not_on_tcp(
    make_kernelspec: KernelSpecFactory, host_config: dict[str, Any], login: str
) -> None:
    config = {**host_config, "remote_transport": "ipc"}
    async with running_kernel(make_kernelspec, config) as (km, kc):
        info = await km.provisioner.get_provisioner_info()
        out, _ = await execute(kc, "print(get_ipython().kernel.iopub_thread._pipe_port or 0)")
        iopub_pipe = {int(out)} - {0}  # ipykernel's own pipe for subprocess output
        assert kernel_tcp_listeners(info["pid"]) - iopub_pipe == set()
        other = "nobody"
        for endpoint in info["endpoints"].values():
            probe = subprocess.run(
                ["runuser", "-u", other, "--", sys.executable, "-c",
                 "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])",
                 endpoint],
                capture_output=True, text=True, check=False, timeout=30,
            )  # fmt: skip
            assert probe.returncode != 0
            assert "Permission denied" in probe.stderr


async def test_tcp_endpoints_listen_on_loopback_only(
    make_kernelspec: KernelSpecFactory, host_config: dict[str, Any]
) -> None:
    from ssh_provisioner.host.process import tcp_listeners

    async with running_kernel(make_kernelspec, host_config) as (km, _):
        info = await km.provisioner.get_provisioner_info()
        ports = set(info["endpoints"].values())
        assert set(tcp_listeners(ports) or {}) == ports
        table = Path("/proc/net/tcp").read_text().splitlines()[1:]
        for line in table:
            fields = line.split()
            address, _, port = fields[1].partition(":")
            if fields[3] == "0A" and int(port, 16) in ports:
                assert address == "0100007F"


async def test_a_host_user_at_the_relay_reaches_nothing(
    make_kernelspec: KernelSpecFactory, host_config: dict[str, Any], test_user: str
) -> None:
    """With tcp, any user on the host can connect to the launcher's relay port on
    127.0.0.1: without the token the relay closes the connection before it reaches
    the kernel (no ZMTP greeting, no output)."""
    async with running_kernel(make_kernelspec, host_config) as (km, kc):
        info = await km.provisioner.get_provisioner_info()
        relay = info["handshake"]["relay"]
        assert isinstance(relay, int)
        probe = subprocess.run(
            ["runuser", "-u", test_user, "--", sys.executable, "-c", INTRUDER, str(relay)],
            capture_output=True, text=True, check=False, timeout=60,
        )  # fmt: skip
        assert probe.stdout.split() == ["closed", "closed"], probe.stdout + probe.stderr
        out, _ = await execute(kc, "print('still mine')")
        assert out.strip() == "still mine"


BEGINS = f"printf '\\n%s\\n' {shlex.quote(LAUNCHER_BEGINS)}"  # as the launcher begins


@pytest.mark.parametrize(
    ("script", "error", "words"),
    [
        # after the launcher's first line, anything but a handshake
        (f"{BEGINS}; echo 'not json at all'", LaunchError, "invalid handshake"),
        (f'{BEGINS}; echo \'{{"event": "ready"}}\'', LaunchError, "invalid handshake"),
        (f"{BEGINS}; head -c 3000000 /dev/zero | tr '\\0' x", LaunchError, "longer than"),
        # no launcher at all: what it printed is in the error
        ("echo 'not json at all'", LaunchError, "its stdout: 'not json at all'"),
        ("head -c 5000000 /dev/zero | tr '\\0' x", LaunchError, "bytes of output before"),
        ("exit 0", LaunchError, "before its handshake"),
        ("exec sleep 120", LaunchTimeout, "launch_timeout"),
    ],
)
async def test_hostile_launcher_output(
    make_kernelspec: KernelSpecFactory,
    host_config: dict[str, Any],
    shared_tmp: Path,
    script: str,
    error: type[Exception],
    words: str,
) -> None:
    """Whatever comes back instead of a handshake fails the start cleanly, in time."""
    fake = shared_tmp / "fake-python"
    fake.write_text(f"#!/bin/sh\n{script}\n")
    fake.chmod(0o755)
    config = {**host_config, "remote_python": str(fake), "launch_timeout": 2.0}
    assert words in await start_failing(make_kernelspec, config, error)


async def test_a_changed_host_key_is_refused_on_reconnect(
    make_kernelspec: KernelSpecFactory, client_key: tuple[Path, str], tmp_path: Path
) -> None:

    daemon: SSHDaemon = start_sshd(tmp_path / "host", "127.0.0.8", client_key[1] + "\n")
    try:
        config = rig_config(daemon, client_key[0], pool_idle_timeout=0)
        async with running_kernel(make_kernelspec, config):
            pass
        daemon.stop()
        generate_key(tmp_path / "host" / "host_ed25519.new")
        (tmp_path / "host" / "host_ed25519.new").replace(tmp_path / "host" / "host_ed25519")
        daemon.start()
        assert "CHANGED" in await start_failing(make_kernelspec, config, HostKeyError)
    finally:
        daemon.stop()


CURVE_SPEC = {"metadata": {"supported_encryption": ["curve"]}}
HANDSHAKE_FAILED = {
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
    zmq.EVENT_HANDSHAKE_FAILED_AUTH,
}


async def zmtp_handshake(url: str, server_key: bytes | None) -> int:
    """Connect a DEALER to ``url`` (as a CURVE client of ``server_key``, or plain) and
    return the monitor event that ends its handshake: succeeded or failed."""
    import zmq.asyncio
    from zmq.utils.monitor import parse_monitor_message

    ends = {zmq.EVENT_HANDSHAKE_SUCCEEDED, *HANDSHAKE_FAILED}
    context = zmq.asyncio.Context()
    sock = context.socket(zmq.DEALER)
    sock.linger = 0
    try:
        if server_key is not None:
            sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
            sock.curve_serverkey = server_key
        monitor = sock.get_monitor_socket()
        sock.connect(url)
        async with asyncio.timeout(20):
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())
                if event["event"] in ends:
                    return int(event["event"])
    finally:
        sock.disable_monitor()
        sock.close(0)
        context.destroy(0)


@pytest.mark.parametrize(("policy", "transport"), [("auto", "tcp"), ("required", "ipc")])
async def test_curve_encrypts_every_channel_and_refuses_clients_without_the_key(
    make_kernelspec: KernelSpecFactory,
    host_config: dict[str, Any],
    policy: str,
    transport: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from ..helpers import cmdlines_containing

    caplog.set_level(logging.DEBUG)
    options = {"transport_encryption": policy}
    config = {**host_config, "remote_transport": transport}
    async with running_kernel(make_kernelspec, config, manager_options=options, **CURVE_SPEC) as (
        km,
        kc,
    ):
        assert km.curve_publickey is not None
        assert km.curve_secretkey is not None
        assert km.get_connection_info()["curve_publickey"] == km.curve_publickey.decode()
        # the kernel is the CURVE server of its channels, with the manager's key pair
        out, _ = await execute(
            kc,
            "from ipykernel.kernelapp import IPKernelApp as A; import os, stat, json\n"
            "app = A.instance(); f = app.abs_connection_file\n"
            "print(json.dumps([app.curve_publickey.decode(), app.shell_socket.curve_server,"
            " oct(stat.S_IMODE(os.stat(f).st_mode)), 'curve_secretkey' in json.load(open(f))]))",
        )
        assert json.loads(out) == [km.curve_publickey.decode(), True, "0o600", True]
        assert cmdlines_containing(km.curve_secretkey) == []

        info = await km.provisioner.get_provisioner_info()
        local = f"tcp://127.0.0.1:{km.shell_port}"
        shell = info["endpoints"]["shell"]
        on_host = f"ipc://{shell}" if transport == "ipc" else f"tcp://127.0.0.1:{shell}"
        for url in (local, on_host):
            assert await zmtp_handshake(url, km.curve_publickey) == zmq.EVENT_HANDSHAKE_SUCCEEDED
            assert await zmtp_handshake(url, None) in HANDSHAKE_FAILED
            stranger = zmq.curve_keypair()[0]
            assert await zmtp_handshake(url, stranger) in HANDSHAKE_FAILED

        await km.restart_kernel()  # a restart keeps the keys, like the session key
        await kc.wait_for_ready(timeout=30)
        out, _ = await execute(kc, "print('after restart')")
        assert out.strip() == "after restart"
        assert cmdlines_containing(km.curve_secretkey) == []
    assert km.curve_secretkey.decode() not in "\n".join(r.getMessage() for r in caplog.records)


async def test_curve_is_off_when_the_kernelspec_does_not_declare_it(
    make_kernelspec: KernelSpecFactory, host_config: dict[str, Any]
) -> None:
    options = {"transport_encryption": "auto"}
    async with running_kernel(make_kernelspec, host_config, manager_options=options) as (km, kc):
        assert km.curve_publickey is None
        out, _ = await execute(
            kc,
            "from ipykernel.kernelapp import IPKernelApp as A; print(A.instance().curve_publickey)",
        )
        assert out.strip() == "None"
