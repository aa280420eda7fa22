"""Bad input gets an error of the right type that names the host and the cause,
and leaves nothing behind on either side."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ssh_provisioner import (
    AuthenticationError,
    HostKeyError,
    LaunchError,
    LaunchTimeout,
    ProvisionerConfigError,
    SSHConnectError,
)

from ..conftest import KernelSpecFactory, connect_options, rig_config
from ..helpers import start_failing
from ..sshd import SSHDaemon, free_port, generate_key

pytestmark = [pytest.mark.sshd, pytest.mark.usefixtures("no_leaks")]


@pytest.fixture
def root_config(host_a: SSHDaemon, client_key: tuple[Path, str]) -> dict[str, Any]:
    return rig_config(host_a, client_key[0], launch_timeout=20.0)


async def test_unknown_host_name(make_kernelspec: KernelSpecFactory, root_config: dict) -> None:
    config = {**root_config, "hosts": ["no-such-host.invalid"]}
    message = await start_failing(make_kernelspec, config, SSHConnectError)
    assert "no-such-host.invalid" in message
    assert "resolve" in message


async def test_connection_refused(make_kernelspec: KernelSpecFactory, root_config: dict) -> None:
    destination = f"root@127.0.0.2:{free_port('127.0.0.2')}"
    config = {**root_config, "hosts": [destination]}
    message = await start_failing(make_kernelspec, config, SSHConnectError)
    assert destination in message
    assert "refused" in message


async def test_authentication_refused(
    make_kernelspec: KernelSpecFactory, root_config: dict, host_a: SSHDaemon, tmp_path: Path
) -> None:
    stranger = tmp_path / "stranger_key"
    generate_key(stranger)
    config = {**root_config, "connect_options": connect_options(host_a, stranger)}
    message = await start_failing(make_kernelspec, config, AuthenticationError)
    assert host_a.destination("root") in message
    assert "authentication refused" in message


async def test_unknown_host_key_is_refused(
    make_kernelspec: KernelSpecFactory,
    root_config: dict,
    host_a: SSHDaemon,
    client_key: tuple[Path, str],
    tmp_path: Path,
) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    options = connect_options(host_a, client_key[0], known_hosts=str(empty))
    message = await start_failing(
        make_kernelspec, {**root_config, "connect_options": options}, HostKeyError
    )
    assert host_a.destination("root") in message
    assert "unknown" in message


async def test_changed_host_key_is_refused(
    make_kernelspec: KernelSpecFactory,
    root_config: dict,
    host_a: SSHDaemon,
    client_key: tuple[Path, str],
    tmp_path: Path,
) -> None:
    impostor = generate_key(tmp_path / "other_host_key")
    known = tmp_path / "known_hosts"
    known.write_text(host_a.known_hosts_line(impostor) + "\n")
    options = connect_options(host_a, client_key[0], known_hosts=str(known))
    message = await start_failing(
        make_kernelspec, {**root_config, "connect_options": options}, HostKeyError
    )
    assert host_a.destination("root") in message
    assert "CHANGED" in message


async def test_disabling_host_key_checks_is_refused(
    make_kernelspec: KernelSpecFactory, root_config: dict, host_a: SSHDaemon
) -> None:
    options = {**root_config["connect_options"], "known_hosts": None}
    message = await start_failing(
        make_kernelspec, {**root_config, "connect_options": options}, ProvisionerConfigError
    )
    assert "known_hosts" in message


async def test_remote_python_not_found(
    make_kernelspec: KernelSpecFactory, root_config: dict
) -> None:
    config = {**root_config, "remote_python": "/opt/no/such/python3"}
    message = await start_failing(make_kernelspec, config, LaunchError)
    assert root_config["hosts"][0] in message
    assert "/opt/no/such/python3" in message
    assert "not found" in message


async def test_kernel_argv_not_found(make_kernelspec: KernelSpecFactory, root_config: dict) -> None:
    message = await start_failing(
        make_kernelspec,
        root_config,
        LaunchError,
        argv=["no-such-kernel-binary", "-f", "{connection_file}"],
    )
    assert root_config["hosts"][0] in message
    assert "'no-such-kernel-binary' not found on the host" in message


async def test_kernel_exits_before_the_handshake(
    make_kernelspec: KernelSpecFactory, root_config: dict
) -> None:
    argv = [sys.executable, "-c", "import sys; print('boom-marker', file=sys.stderr); sys.exit(4)"]
    message = await start_failing(make_kernelspec, root_config, LaunchError, argv=argv)
    assert root_config["hosts"][0] in message
    assert "status 4" in message
    assert "boom-marker" in message


async def test_launch_timeout(make_kernelspec: KernelSpecFactory, root_config: dict) -> None:
    argv = [sys.executable, "-c", "import time; time.sleep(120)", "{connection_file}"]
    started = time.monotonic()
    message = await start_failing(
        make_kernelspec, {**root_config, "launch_timeout": 1.5}, LaunchTimeout, argv=argv
    )
    assert time.monotonic() - started < 10
    assert root_config["hosts"][0] in message
    assert "launch_timeout" in message


async def test_remote_cwd_missing(make_kernelspec: KernelSpecFactory, root_config: dict) -> None:
    config = {**root_config, "remote_cwd": "/no/such/dir"}
    message = await start_failing(make_kernelspec, config, LaunchError)
    assert "/no/such/dir" in message


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("host", ["x"], "did you mean 'hosts'"),
        ("launch_timeout", "soon", "launch_timeout"),
        ("remote_transport", "udp", "remote_transport"),
        ("hosts", ["root@gpu1:99999"], "invalid port"),
    ],
)
async def test_kernelspec_config_typo(
    make_kernelspec: KernelSpecFactory,
    root_config: dict,
    option: str,
    value: Any,
    expected: str,
) -> None:
    config = {**root_config, option: value}
    message = await start_failing(make_kernelspec, config, ProvisionerConfigError)
    assert expected in message
    assert "SSH test" in message  # names the kernelspec


async def test_connect_timeout_on_a_silent_host(
    make_kernelspec: KernelSpecFactory, root_config: dict
) -> None:
    """A host that accepts TCP but never speaks SSH (a hung sshd, a black-holing proxy)."""
    silent = socket.socket()
    silent.bind(("127.0.0.2", 0))
    silent.listen()
    try:
        destination = f"root@127.0.0.2:{silent.getsockname()[1]}"
        config = {**root_config, "hosts": [destination], "connect_timeout": 1.0}
        started = time.monotonic()
        message = await start_failing(make_kernelspec, config, SSHConnectError)
        assert time.monotonic() - started < 5
        assert destination in message
        assert "timed out" in message
    finally:
        silent.close()
