"""Fixtures: real sshd daemons with generated keys, a second login user, kernelspecs."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.kernelspec import KernelSpecManager

from ssh_provisioner import SSHProvisioner
from ssh_provisioner.engine import shutdown_engine
from ssh_provisioner.host.supervisor import RUNTIME_DIR_PREFIX
from ssh_provisioner.status import board

from .leaks import TAG_VARIABLE, TestMarks, leftover_dirs, leftover_processes, own_listeners
from .netns import Link, namespace_host
from .slurm import SlurmCluster, running_cluster, slurm_missing_reason
from .sshd import (
    TEST_USER,
    SSHDaemon,
    SSHDUnavailable,
    generate_key,
    hold_test_user,
    release_test_user,
    running_sshd,
    sshd_unavailable_reason,
    start_sshd,
    test_user_exists,
    user_can_run_kernel,
)

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# The longest modules first.  With pytest-xdist's loadfile a module runs on one worker,
# handed out in collection order, and one handed out last is the run's tail (the soak
# alone takes nearly three minutes, the Slurm module more).
LONGEST_FIRST = ("test_slurm.py", "test_soak.py", "test_control_master.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each module keeps its own order
    reason = sshd_unavailable_reason()
    if reason is None:
        return
    for item in items:
        if "sshd" in item.keywords:
            if IN_CI:  # in CI a missing sshd is a failure, never a silent skip
                item.add_marker(pytest.mark.xfail(reason=reason, strict=True, run=False))
            else:
                item.add_marker(pytest.mark.skip(reason=reason))


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def rig_dir() -> Iterator[Path]:
    # world-traversable: the unprivileged test user's sshd reads authorized_keys here
    path = Path(tempfile.mkdtemp(prefix="sshp-rig-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def client_key(rig_dir: Path) -> tuple[Path, str]:
    path = rig_dir / "client_ed25519"
    return path, generate_key(path)


TEST_USER_HELD = pytest.StashKey[bool]()


def pytest_configure(config: pytest.Config) -> None:
    """The second login user is held once per run, before any worker starts (two
    pytest-xdist workers must not race to make it, nor one remove it under the other);
    another checkout's session may hold it too (see hold_test_user)."""
    if hasattr(config, "workerinput") or sshd_unavailable_reason() is not None:
        return
    config.stash[TEST_USER_HELD] = bool(hold_test_user())


def pytest_unconfigure(config: pytest.Config) -> None:
    if config.stash.get(TEST_USER_HELD, False):
        release_test_user()


@pytest.fixture(scope="session")
def test_user() -> str:
    reason = sshd_unavailable_reason()
    if reason:
        _unavailable(reason)
    user = TEST_USER  # held by pytest_configure
    if not test_user_exists():
        _unavailable(f"no user {user}: pytest_configure could not make it")
    problem = user_can_run_kernel(user, sys.executable)
    if problem:
        _unavailable(problem)
    return user


@pytest.fixture(scope="session")
def host_a(rig_dir: Path, client_key: tuple[Path, str]) -> Iterator[SSHDaemon]:
    try:
        with running_sshd(rig_dir / "host-a", "127.0.0.2", client_key[1] + "\n") as daemon:
            yield daemon
    except SSHDUnavailable as exc:
        _unavailable(str(exc))


TRIO = (
    # name, address, fake /proc/loadavg (1-min load), fake GPUs (free, total, util) or None
    ("host-a", "127.0.0.3", "0.50", None),
    ("host-b", "127.0.0.4", "3.00", "1000, 16000, 5\n8000, 16000, 50\n"),
    ("host-c", "127.0.0.5", "1.50", "3000, 24000, 80\n12000, 24000, 10\n"),
)


@pytest.fixture(scope="session")
def trio(rig_dir: Path, client_key: tuple[Path, str]) -> Iterator[list[SSHDaemon]]:
    """Three hosts, each with its own hostname, load average and GPUs (or none).

    Loopback hosts share one kernel, so a busy process would load them all alike:
    each host gets its own /proc/loadavg (a bind mount in its own mount namespace)
    and its own nvidia-smi (first on the PATH its sshd sets)."""
    reason = sshd_unavailable_reason()
    if reason:
        _unavailable(reason)
    daemons: list[SSHDaemon] = []
    try:
        for name, address, load, gpus in TRIO:
            directory = rig_dir / f"trio-{name}"
            directory.mkdir()
            loadavg = directory / "loadavg"
            loadavg.write_text(f"{load} {load} {load} 1/100 12345\n")
            bin_dir = directory / "bin"
            bin_dir.mkdir()
            if gpus is not None:
                (directory / "gpus.csv").write_text(gpus)
                smi = bin_dir / "nvidia-smi"
                smi.write_text(f"#!/bin/sh\nexec cat {directory / 'gpus.csv'}\n")
                smi.chmod(0o755)
            daemons.append(
                start_sshd(
                    directory,
                    address,
                    client_key[1] + "\n",
                    hostname=name,
                    bind_mounts={"/proc/loadavg": loadavg},
                    set_env={"PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin"},
                )
            )
        yield daemons
    except SSHDUnavailable as exc:
        _unavailable(str(exc))
    finally:
        for daemon in daemons:
            daemon.stop()


@pytest.fixture
def trio_config(trio: list[SSHDaemon], client_key: tuple[Path, str]) -> dict[str, Any]:
    """Provisioner config over the three hosts, as root; known_hosts lists all three."""
    known_hosts = trio[0].directory.parent / "trio_known_hosts"
    known_hosts.write_text("".join(d.known_hosts_line() + "\n" for d in trio))
    return {
        "hosts": [d.destination("root") for d in trio],
        "connect_options": {
            **connect_options(trio[0], client_key[0]),
            "known_hosts": str(known_hosts),
        },
        "remote_python": sys.executable,
        "launch_timeout": 30.0,
        "orphan_timeout": 5.0,
    }


@pytest.fixture(params=["root", "user"])
def login(request: pytest.FixtureRequest) -> str:
    """Both a root login and an unprivileged one must work."""
    if request.param == "root":
        return "root"
    user: str = request.getfixturevalue("test_user")
    return user


def connect_options(daemon: SSHDaemon, key: Path, **extra: Any) -> dict[str, Any]:
    """Hermetic options: this rig's key and known_hosts, no ~/.ssh/config, no agent."""
    return {
        "client_keys": [str(key)],
        "known_hosts": str(daemon.known_hosts),
        "config": [],
        "agent_path": "",
        **extra,
    }


def rig_config(daemon: SSHDaemon, key: Path, login: str = "root", **extra: Any) -> dict[str, Any]:
    """The one way to write a provisioner config for a rig host: ``login`` there with
    the rig's key, the rig's known_hosts, this interpreter as the host's Python."""
    return {
        "hosts": [daemon.destination(login)],
        "connect_options": connect_options(daemon, key),
        "remote_python": sys.executable,
        **extra,
    }


KernelSpecFactory = Callable[..., tuple[KernelSpecManager, str]]


@pytest.fixture
def make_kernelspec(tmp_path: Path) -> KernelSpecFactory:
    """Write a kernelspec that names ssh-provisioner; returns (manager, name)."""
    counter = iter(range(1000))

    def factory(
        provisioner_config: dict[str, Any],
        *,
        argv: list[str] | None = None,
        env: dict[str, str] | None = None,
        interrupt_mode: str = "signal",
        provisioner_name: str = "ssh-provisioner",
        files: dict[str, str] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> tuple[KernelSpecManager, str]:
        name = f"ssh-test-{next(counter)}"
        kernel_dir = tmp_path / "kernels" / name
        kernel_dir.mkdir(parents=True)
        spec = {
            "argv": argv or ["python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": f"SSH test {name}",
            "language": "python",
            "interrupt_mode": interrupt_mode,
            "env": env or {},
            "metadata": {
                **(metadata or {}),
                "kernel_provisioner": {
                    "provisioner_name": provisioner_name,
                    "config": provisioner_config,
                },
            },
        }
        (kernel_dir / "kernel.json").write_text(json.dumps(spec))
        for file_name, text in (files or {}).items():
            (kernel_dir / file_name).write_text(text)
        ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
        return ksm, name

    return factory


@pytest.fixture
def two_session_host(
    tmp_path: Path, client_key: tuple[Path, str]
) -> Iterator[tuple[SSHDaemon, dict[str, Any]]]:
    """A host whose sshd allows 2 sessions per connection (MaxSessions; OpenSSH's
    default is 10), and a provisioner config for it as root."""
    daemon = start_sshd(tmp_path / "two", "127.0.0.10", client_key[1] + "\n", max_sessions=2)
    config = rig_config(daemon, client_key[0])
    yield daemon, config
    daemon.stop()


@pytest.fixture
def host_config(host_a: SSHDaemon, client_key: tuple[Path, str], login: str) -> dict[str, Any]:
    """Provisioner config for a kernel on host A as the parametrized login."""
    return rig_config(host_a, client_key[0], login, launch_timeout=30.0, orphan_timeout=5.0)


@pytest.fixture(autouse=True)
async def _close_engine() -> AsyncIterator[None]:
    """Every test starts with a fresh SSH engine: no connection outlives its test."""
    yield
    await asyncio.to_thread(shutdown_engine)


def remote_leftovers() -> dict[str, Any]:
    """Every runtime dir of this package's launchers on the machine, whoever made it."""
    dirs = sorted(str(p) for p in Path(tempfile.gettempdir()).glob(RUNTIME_DIR_PREFIX + "*"))
    return {"runtime_dirs": dirs}


@pytest.fixture
async def no_leaks(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[TestMarks]:
    """Fails the test if it leaves a launcher, kernel, runtime dir or 127.0.0.1 listener
    of its own (tests/leaks.py: other kernels on the machine are not judged)."""
    from .helpers import wait_until

    marks = TestMarks(secrets.token_hex(6))
    monkeypatch.setenv(TAG_VARIABLE, marks.tag)
    launch = SSHProvisioner.pre_launch

    async def recording(self: SSHProvisioner, **kwargs: Any) -> dict[str, Any]:
        marks.kernel_ids.add(str(self.kernel_id)[:8])
        result: dict[str, Any] = await launch(self, **kwargs)
        return result

    monkeypatch.setattr(SSHProvisioner, "pre_launch", recording)

    def posted(kernel_id: str, before: dict[str, Any], after: dict[str, Any]) -> None:
        marks.kernel_ids.add(kernel_id[:8])  # a pre-spawned kernel's too (no pre_launch)

    monkeypatch.setattr(board, "_listeners", [*board._listeners, posted])
    listening_before = own_listeners()
    yield marks
    await asyncio.to_thread(shutdown_engine)

    def clean() -> bool:
        return not (
            leftover_processes(marks) or leftover_dirs(marks) or own_listeners() - listening_before
        )

    try:
        await wait_until(clean, 10.0, "the kernel's processes, dirs and listeners to go")
    except AssertionError:
        raise AssertionError(
            f"left behind: processes {leftover_processes(marks)}, runtime dirs "
            f"{leftover_dirs(marks)}, listeners {own_listeners() - listening_before}"
        ) from None


@pytest.fixture
def host_behind_a_link(
    tmp_path: Path, client_key: tuple[Path, str]
) -> Iterator[tuple[Link, dict[str, Any]]]:
    """A host in its own network namespace, whose link we can cut, and a config for it
    whose keepalives (every second) notice a cut quickly."""
    with namespace_host() as link:
        daemon = start_sshd(
            tmp_path / "ns-host", link.address, client_key[1] + "\n", netns=link.namespace
        )
        config = rig_config(daemon, client_key[0], keepalive_interval=1.0)
        try:
            yield link, config
        finally:
            daemon.stop()


@pytest.fixture(scope="session")
def slurm_cluster(client_key: tuple[Path, str]) -> Iterator[SlurmCluster]:
    """A real Slurm: three compute nodes with two fake GPUs each, and a login node."""
    reason = slurm_missing_reason()
    if reason:
        _unavailable(reason)
    directory = Path(tempfile.mkdtemp(prefix="sshp-slurm-"))
    directory.chmod(0o755)  # users' jobs read slurm.conf and reach munge's socket in it
    try:
        with running_cluster(directory / "cluster", client_key[1] + "\n") as cluster:
            yield cluster
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def slurm_config(
    slurm_cluster: SlurmCluster, client_key: tuple[Path, str]
) -> Iterator[dict[str, Any]]:
    """Provisioner config for kernels as Slurm jobs through the login node, as root.
    The test must leave the queue empty and the nodes clean (slurmstepd, Slurm's own,
    takes a moment to finish after a job has left the queue)."""
    login = slurm_cluster.login
    assert login is not None
    yield {
        "hosts": [login.destination("root")],
        "connect_options": connect_options(login, client_key[0]),
        "remote_python": sys.executable,
        "launch_timeout": 30.0,
        "orphan_timeout": 10.0,
        "slurm": {
            "partition": "gpu",
            "time": "00:30:00",
            "poll_interval": 1,
            "empty_job_timeout": 10,
        },
    }
    slurm_cluster.wait_queue_empty(30)
    for node in slurm_cluster.nodes:
        node.wait_until_clean(15)
