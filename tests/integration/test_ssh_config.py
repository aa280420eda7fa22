"""What the user's ssh config may and may not do: it cannot switch host-key checking
off (unless an admin allows it), and its ProxyJump hops get the same connect options
(known_hosts, client keys, keepalives) as the host itself."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ssh_provisioner import HostKeyError

from ..conftest import KernelSpecFactory
from ..helpers import execute, start_failing
from ..kit import running_kernel
from ..netns import namespace_host
from ..sshd import SSHDaemon, generate_key, start_sshd

pytestmark = [pytest.mark.sshd, pytest.mark.usefixtures("no_leaks")]


def hermetic(key: Path, config_file: Path, **extra: Any) -> dict[str, Any]:
    """Connect options that read only ``config_file`` (no ~/.ssh, no agent)."""
    return {"client_keys": [str(key)], "config": [str(config_file)], "agent_path": "", **extra}


@pytest.mark.parametrize(
    ("block", "lines", "named"),
    [
        ("Host {address}", ["UserKnownHostsFile none"], ["'UserKnownHostsFile none'"]),
        (
            "Host {address}",
            ["StrictHostKeyChecking no", "UserKnownHostsFile /dev/null"],
            ["'UserKnownHostsFile /dev/null'", "'StrictHostKeyChecking no'"],
        ),
        # asyncssh reads these only in its second pass over the config
        ("Match final", ["UserKnownHostsFile none"], ["'UserKnownHostsFile none'"]),
        ("Match final host {address}", ["UserKnownHostsFile none"], ["'UserKnownHostsFile none'"]),
        ("Match final", ["Include {included}"], ["'UserKnownHostsFile none'"]),
    ],
)
async def test_an_ssh_config_line_cannot_switch_host_key_checking_off(
    make_kernelspec: KernelSpecFactory,
    host_a: SSHDaemon,
    client_key: tuple[Path, str],
    tmp_path: Path,
    block: str,
    lines: list[str],
    named: list[str],
) -> None:
    """The host's key is in no known_hosts file, and the config says not to check:
    the start is refused with the file and line named; an admin may allow it."""
    config_file = tmp_path / "ssh_config"
    included = tmp_path / "included_config"
    included.write_text("# a file included inside a Match block\nUserKnownHostsFile none\n")
    where = f"{included} line 2" if "Include" in lines[0] else f"{config_file} line 4"
    config_file.write_text(
        "Host elsewhere\n  User nobody\n"
        + block.format(address=host_a.address)
        + "\n"
        + "".join(f"  {line.format(included=included)}\n" for line in lines)
    )
    config = {
        "hosts": [host_a.destination("root")],
        "connect_options": hermetic(client_key[0], config_file),
        "remote_python": sys.executable,
    }
    message = await start_failing(make_kernelspec, config, HostKeyError)
    for line in named:
        assert line in message
    assert where in message
    assert "allow_unchecked_host_keys" in message
    assert str(host_a.port) in message  # the host is named
    allowed = {**config, "allow_unchecked_host_keys": True}
    async with running_kernel(make_kernelspec, allowed) as (_, kc):
        out, _ = await execute(kc, "print('unchecked, as the admin allowed')")
        assert "allowed" in out


def test_the_doctor_never_calls_an_unchecked_key_known(
    host_a: SSHDaemon, client_key: tuple[Path, str]
) -> None:
    check = [
        str(Path(sys.executable).parent / "ssh-provisioner"), "check",
        "--host", host_a.destination("root"), "--python", sys.executable,
        "--connect-option", f"client_keys=[\"{client_key[0]}\"]",
        "--connect-option", "config=[]", "--connect-option", "agent_path=\"\"",
    ]  # fmt: skip
    refused = subprocess.run(
        [*check, "--connect-option", "known_hosts=null"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert refused.returncode == 1
    assert "known and matching" not in refused.stdout
    assert "known_hosts=null" in refused.stdout
    checked = subprocess.run(
        [*check, "--connect-option", f"known_hosts=\"{host_a.known_hosts}\""],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "known and matching" in checked.stdout


CANONICAL = "CanonicalizeHostname yes\nCanonicalDomains corp.example\n"


@pytest.mark.parametrize(
    "config_text",
    [
        CANONICAL + "Host *.corp.example\n  UserKnownHostsFile none\n",
        CANONICAL + "Match canonical\n  UserKnownHostsFile none\n",
        CANONICAL + "Match canonical host gpu1.corp.example\n  UserKnownHostsFile none\n",
    ],
)
def test_a_canonicalized_name_cannot_switch_host_key_checking_off(
    host_a: SSHDaemon, client_key: tuple[Path, str], tmp_path: Path, config_text: str
) -> None:
    """``gpu1`` becomes ``gpu1.corp.example`` (resolved through a private /etc/hosts in
    a mount namespace of its own), and only that name's block turns checking off: the
    connection every start and the doctor make is refused, naming the line."""
    config_file = tmp_path / "ssh_config"
    config_file.write_text(config_text)
    refused = _check_in_private_hosts(host_a, client_key[0], config_file, tmp_path)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "'UserKnownHostsFile none'" in refused.stdout
    assert f"{config_file} line 4" in refused.stdout
    assert "known and matching" not in refused.stdout
    # the same block pointing at a file that has the key: checked against that file
    config_file.write_text(config_text.replace("none", str(host_a.known_hosts)))
    checked = _check_in_private_hosts(host_a, client_key[0], config_file, tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"known and matching (in {host_a.known_hosts})" in checked.stdout


def _check_in_private_hosts(
    host: SSHDaemon, key: Path, config_file: Path, tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n{host.address} gpu1.corp.example\n")
    command = [
        "unshare", "--mount", "--propagation", "private",
        "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts),
        str(Path(sys.executable).parent / "ssh-provisioner"), "check",
        "--host", f"root@gpu1:{host.port}", "--python", sys.executable,
        "--connect-option", f"client_keys=[\"{key}\"]",
        "--connect-option", f"config=[\"{config_file}\"]",
        "--connect-option", "agent_path=\"\"",
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def behind_a_jump_host(
    tmp_path: Path, client_key: tuple[Path, str]
) -> Iterator[tuple[SSHDaemon, SSHDaemon]]:
    """A jump host this machine reaches, in front of a host with its own name that only
    the jump host reaches (on the loopback of their network namespace)."""
    with namespace_host() as link:
        jump = start_sshd(
            tmp_path / "jump", link.address, client_key[1] + "\n", netns=link.namespace
        )
        try:
            target = start_sshd(
                tmp_path / "behind", "127.0.0.1", client_key[1] + "\n",
                netns=link.namespace, hostname="behind-the-jump",
            )  # fmt: skip
            try:
                yield jump, target
            finally:
                target.stop()
        finally:
            jump.stop()


def jump_config(
    tmp_path: Path, key: Path, jump: SSHDaemon, target: SSHDaemon, known_hosts: list[str]
) -> dict[str, Any]:
    config_file = tmp_path / "ssh_config_jump"
    config_file.write_text(
        "Host behind\n  HostName 127.0.0.1\n  User root\n"
        f"  ProxyJump root@{jump.address}:{jump.port}\n"
    )
    known = tmp_path / "known_hosts_jump"
    known.write_text("".join(line + "\n" for line in known_hosts))
    return {
        "hosts": ["behind"],
        "connect_options": hermetic(key, config_file, known_hosts=str(known)),
        "remote_python": sys.executable,
        "pool_idle_timeout": 0,
    }


async def test_proxyjump_hops_use_the_same_connect_options(
    make_kernelspec: KernelSpecFactory,
    behind_a_jump_host: tuple[SSHDaemon, SSHDaemon],
    client_key: tuple[Path, str],
    tmp_path: Path,
) -> None:
    """Through the jump host with this rig's key and known_hosts (neither is in ~/.ssh);
    a changed key on either hop is refused, naming that hop."""
    jump, target = behind_a_jump_host
    good = [jump.known_hosts_line(), target.known_hosts_line()]
    config = jump_config(tmp_path, client_key[0], jump, target, good)
    async with running_kernel(make_kernelspec, config) as (_, kc):
        out, _ = await execute(kc, "import socket; print(socket.gethostname())")
        assert out.strip() == "behind-the-jump"

    other_key = generate_key(tmp_path / "other_host_key").split()
    stranger = f"{other_key[0]} {other_key[1]}"
    changed_jump = [jump.known_hosts_line(stranger), target.known_hosts_line()]
    config = jump_config(tmp_path, client_key[0], jump, target, changed_jump)
    message = await start_failing(make_kernelspec, config, HostKeyError)
    assert jump.address in message
    assert "jump host on the way to behind" in message

    changed_target = [jump.known_hosts_line(), target.known_hosts_line(stranger)]
    config = jump_config(tmp_path, client_key[0], jump, target, changed_target)
    message = await start_failing(make_kernelspec, config, HostKeyError)
    assert "jump host" not in message
    assert "127.0.0.1" in message
