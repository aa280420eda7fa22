"""Kernels through the user's own OpenSSH master, on a host that demands a real second
factor (PAM OATH) on every login: the master logs in once, by hand; the provisioner
never logs in at all.  The sshd's log counts the logins."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pwd
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager, KernelManager

from ssh_provisioner import AuthenticationError, ControlMasterError
from ssh_provisioner.engine import get_engine
from ssh_provisioner.hosts import HostEntry
from ssh_provisioner.policies import HostPolicy, Placement, PlacementView

from ..conftest import KernelSpecFactory
from ..helpers import (
    cmdlines_containing,
    execute,
    interrupt_a_running_cell,
    process_alive,
    start_failing,
    wait_until,
)
from ..kit import (
    LINES,
    PROCESS_A,
    Message,
    cli,
    counting_cell,
    follow,
    host_python,
    idle,
    kernel_pid,
    printed_line,
    running_kernel,
    take_over,
)
from ..netns import Link, namespace_host
from ..second_factor import ACCEPTED, MFA_SSHD_CONFIG, Master, SecondFactor, second_factor_host
from ..sshd import SSHDaemon, start_sshd

pytestmark = [pytest.mark.sshd, pytest.mark.usefixtures("no_leaks")]
__all__ = ["second_factor_host"]  # a fixture, used by name

ALIAS = "login-node"


@pytest.fixture
def master(
    tmp_path: Path,
    second_factor_host: tuple[SSHDaemon, SecondFactor],
    client_key: tuple[Path, str],
) -> Iterator[Master]:
    daemon, factor = second_factor_host
    master = Master(tmp_path / "user", daemon, client_key[0], factor, ALIAS)
    try:
        yield master
    finally:
        master.close()


def master_config(master: Master, mode: str = "always", **extra: Any) -> dict[str, Any]:
    """The kernelspec a user writes: the Host alias, and the user's ssh config."""
    return {
        "hosts": [ALIAS],
        "connect_options": {"config": [str(master.config)], "agent_path": ""},
        "remote_python": sys.executable,
        "use_control_master": mode,
        **extra,
    }


def logins(daemon: SSHDaemon) -> int:
    return daemon.log().count(ACCEPTED)


async def test_a_kernel_lives_its_whole_life_through_the_master_with_no_new_login(
    make_kernelspec: KernelSpecFactory,
    second_factor_host: tuple[SSHDaemon, SecondFactor],
    master: Master,
) -> None:
    daemon, _ = second_factor_host
    master.open()
    assert logins(daemon) == 1
    async with running_kernel(make_kernelspec, master_config(master)) as (km, kc):
        out, reply = await execute(kc, "import os; print(os.environ['SSH_CONNECTION'].split()[2])")
        assert reply["status"] == "ok"
        assert out.strip() == daemon.address
        await interrupt_a_running_cell(km, kc)
        old_pid = await kernel_pid(kc)
        await km.restart_kernel()
        await kc.wait_for_ready(timeout=30)
        assert await kernel_pid(kc) != old_pid
        assert not process_alive(old_pid)
        new_pid = await kernel_pid(kc)
        await km.shutdown_kernel()
        assert not process_alive(new_pid)
    assert logins(daemon) == 1


async def test_twelve_kernels_share_the_master_past_the_servers_max_sessions(
    make_kernelspec: KernelSpecFactory,
    second_factor_host: tuple[SSHDaemon, SecondFactor],
    master: Master,
) -> None:
    """sshd's MaxSessions is 10 here, OpenSSH's default: a kernel holds a session only
    while it starts, so twelve run at once on one master."""
    daemon, _ = second_factor_host
    master.open()
    config = master_config(master)

    async def one(index: int) -> None:
        async with running_kernel(make_kernelspec, config) as (_, kc):
            pids.append(await kernel_pid(kc))
            await all_up.wait()
            out, _ = await execute(kc, f"print({index} * 3)")
            assert out.strip() == str(index * 3)

    pids: list[int] = []
    all_up = asyncio.Event()
    tasks = [asyncio.create_task(one(i)) for i in range(12)]
    try:
        await wait_until(lambda: len(pids) == 12 or any(t.done() for t in tasks), 120, "12 up")
        assert len(pids) == 12
        assert all(process_alive(pid) for pid in pids)
        all_up.set()
        await asyncio.gather(*tasks)
    finally:
        all_up.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert logins(daemon) == 1


class ProbeRecorder(HostPolicy):
    """Places by a probe that says where it ran: the probe's output is recorded."""

    name = "probe-recorder"
    probe_command = "echo probed $SSH_CONNECTION"
    seen: ClassVar[list[str | None]] = []

    def rank(self, candidates: Sequence[HostEntry], view: PlacementView) -> list[Placement]:
        self.seen.extend(view.probe(entry) for entry in candidates)
        return [Placement(entry) for entry in candidates]


async def test_a_policy_probe_goes_through_the_master(
    make_kernelspec: KernelSpecFactory,
    second_factor_host: tuple[SSHDaemon, SecondFactor],
    master: Master,
) -> None:
    daemon, _ = second_factor_host
    master.open()
    ProbeRecorder.seen.clear()
    policy = f"{__name__}:ProbeRecorder"
    async with running_kernel(make_kernelspec, master_config(master, policy=policy)) as (_, kc):
        out, _ = await execute(kc, "print('placed')")
        assert out.strip() == "placed"
    assert ProbeRecorder.seen, "the policy ran no probe"
    assert all("probed 127.0.0.1" in (output or "") for output in ProbeRecorder.seen)
    assert logins(daemon) == 1


async def test_always_without_a_master_names_the_command_that_opens_one(
    make_kernelspec: KernelSpecFactory,
    second_factor_host: tuple[SSHDaemon, SecondFactor],
    master: Master,
) -> None:
    daemon, _ = second_factor_host
    message = await start_failing(make_kernelspec, master_config(master), ControlMasterError)
    assert f"ssh -F {master.config} -fN {ALIAS}" in message
    assert master.control_path() in message
    assert logins(daemon) == 0
    assert "Failed" not in daemon.log()  # it did not even try to log in


async def test_auto_without_a_master_tries_its_own_login_and_says_how_to_open_one(
    make_kernelspec: KernelSpecFactory,
    second_factor_host: tuple[SSHDaemon, SecondFactor],
    master: Master,
) -> None:
    daemon, _ = second_factor_host
    message = await start_failing(
        make_kernelspec, master_config(master, "auto"), AuthenticationError
    )
    assert "One-time password" in message  # its own login met the second factor
    assert f"ssh -F {master.config} -fN {ALIAS}" in message
    assert logins(daemon) == 0


async def test_a_dead_master_leaves_the_kernel_unreachable_until_a_new_one_opens(
    make_kernelspec: KernelSpecFactory,
    second_factor_host: tuple[SSHDaemon, SecondFactor],
    master: Master,
) -> None:
    daemon, _ = second_factor_host
    master.open()
    config = master_config(master, reconnect_timeout=60.0)
    async with running_kernel(make_kernelspec, config) as (km, kc):
        pid = await kernel_pid(kc)
        master.kill()
        session = km.provisioner.seat.session  # type: ignore[attr-defined]
        await wait_until(lambda: session.state.value == "unreachable", 10, "unreachable")
        assert await km.provisioner.poll() is None  # not dead: unreachable
        master.open()
        await wait_until(lambda: session.state.value == "running", 30, "the reattach")
        assert await kernel_pid(kc) == pid
        out, _ = await execute(kc, "print('back')")
        assert out.strip() == "back"
    assert logins(daemon) == 2  # one per master: the provisioner never logged in


async def test_with_the_master_gone_auto_asks_the_second_factor_once(
    make_kernelspec: KernelSpecFactory,
    second_factor_host: tuple[SSHDaemon, SecondFactor],
    master: Master,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``auto``, and the master dies under a running kernel: the reconnect loop tries
    again and again, but our own login meets the one-time-code prompt (no rule answers
    it) once, not at every try (sites lock accounts out after a few), and the log says
    once what to do."""
    caplog.set_level(logging.INFO)
    daemon, _ = second_factor_host
    master.open()
    config = master_config(master, "auto", reconnect_timeout=60.0)
    async with running_kernel(make_kernelspec, config) as (km, _):
        prompted_before = prompts(daemon)
        master.kill()
        await wait_until(
            lambda: caplog.text.count("still unreachable") >= 4, 30, "four reconnect tries"
        )
        assert prompts(daemon) - prompted_before == 1
        assert caplog.text.count("not asking") == 1
        assert f"ssh -F {master.config} -fN {ALIAS}" in caplog.text  # what to do
        master.open()  # as told: the kernel is reached through it at the next try
        session = km.provisioner.seat.session  # type: ignore[attr-defined]
        await wait_until(lambda: session.state.value == "running", 30, "the reattach")


def prompts(daemon: SSHDaemon) -> int:
    """Keyboard-interactive exchanges sshd began (each one a one-time-code prompt)."""
    return daemon.log().count("keyboard-interactive")


@pytest.fixture
def master_behind_a_link(
    tmp_path: Path, client_key: tuple[Path, str]
) -> Iterator[tuple[Link, SSHDaemon, Master]]:
    """The login node in its own network namespace, whose link we can cut; the user's
    master notices a dead link after 3 s (ServerAliveInterval 1, as many users set)."""
    factor = SecondFactor(tmp_path / "factor")
    with namespace_host() as link:
        daemon = start_sshd(
            tmp_path / "ns-login", link.address, client_key[1] + "\n",
            netns=link.namespace, bind_mounts={"/etc/pam.d/sshd": factor.pam},
            extra_config=MFA_SSHD_CONFIG, max_sessions=10,
        )  # fmt: skip
        keepalive = ("ServerAliveInterval 1", "ServerAliveCountMax 2")
        master = Master(tmp_path / "user", daemon, client_key[0], factor, ALIAS, keepalive)
        try:
            yield link, daemon, master
        finally:
            master.close()
            daemon.stop()


async def test_a_cut_that_ends_the_master_loses_nothing_once_a_new_master_opens(
    make_kernelspec: KernelSpecFactory, master_behind_a_link: tuple[Link, SSHDaemon, Master]
) -> None:
    link, daemon, master = master_behind_a_link
    master.open()
    config = master_config(master, reconnect_timeout=60.0, orphan_timeout=60.0)
    async with running_kernel(make_kernelspec, config) as (km, kc):
        session = km.provisioner.seat.session  # type: ignore[attr-defined]
        msg_id = kc.execute(counting_cell(0.1))
        messages: list[Message] = []
        await follow(kc, msg_id, messages, printed_line(50))
        link.down()
        cut = time.monotonic()
        await wait_until(lambda: master.pid() is None, 15, "the master to give up on the link")
        await wait_until(lambda: session.state.value != "running", 10, "the loss noticed")
        assert await km.provisioner.poll() is None  # unreachable, not dead
        await asyncio.sleep(max(0.0, cut + 10.0 - time.monotonic()))  # a 10 s outage
        link.up()
        master.open()  # the user types the code once more
        await follow(kc, msg_id, messages, idle)
        printed = "".join(m["content"]["text"] for m in messages if m["msg_type"] == "stream")
        assert printed.split() == [str(i) for i in range(LINES)]  # all of them, in order
        reply = await kc.get_shell_msg(timeout=10)
        assert reply["parent_header"]["msg_id"] == msg_id
        assert session.state.value == "running"
    assert logins(daemon) == 2  # one per master: the provisioner never logged in


# Another user's process at the victim's ControlPath, before any master: it answers the
# mux hello and alive checks as a master would, and keeps whatever it is sent.
FAKE_MASTER = """
import os, socket, struct, sys
path, loot = sys.argv[1], sys.argv[2]
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(path)
os.chmod(path, 0o777)
server.listen(8)
print("listening", flush=True)
while True:
    conn, _ = server.accept()
    conn.settimeout(2)
    try:
        conn.sendall(struct.pack(">III", 8, 1, 4))  # MUX_MSG_HELLO, version 4
        while True:
            data = conn.recv(65536)
            if not data:
                break
            with open(loot, "ab") as out:
                out.write(data)
    except OSError:
        pass
    conn.close()
"""


@contextlib.contextmanager
def impostor_at(path: str, user: str, loot: Path) -> Iterator[None]:
    """``FAKE_MASTER`` listening at ``path`` as ``user``, until the block ends."""
    impostor = subprocess.Popen(
        ["runuser", "-u", user, "--", sys.executable, "-c", FAKE_MASTER, path, str(loot)],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        assert impostor.stdout is not None
        assert impostor.stdout.readline().strip() == "listening"
        yield
    finally:
        os.killpg(impostor.pid, signal.SIGKILL)  # runuser and the impostor under it
        impostor.wait()
        impostor.stdout.close()


@pytest.mark.parametrize(
    ("mode", "error"), [("always", ControlMasterError), ("auto", AuthenticationError)]
)
async def test_a_control_path_taken_by_another_user_gets_nothing(
    make_kernelspec: KernelSpecFactory,
    second_factor_host: tuple[SSHDaemon, SecondFactor],
    client_key: tuple[Path, str],
    test_user: str,
    tmp_path: Path,
    mode: str,
    error: type[Exception],
) -> None:
    """A ControlPath in a shared directory (/tmp) can be taken by another user once no
    master is there.  Whatever answers must be our own process: the socket's peer
    (SO_PEERCRED) is checked before the hello, so the impostor gets not one byte, and
    never the launcher's stdin (the session key)."""
    daemon, factor = second_factor_host
    shared = Path(tempfile.mkdtemp(prefix="sshp-shared-"))
    shared.chmod(0o1777)  # like /tmp
    master = Master(
        tmp_path / "user", daemon, client_key[0], factor, ALIAS, control_path=f"{shared}/%C"
    )
    loot = shared / "loot"
    try:
        with impostor_at(master.control_path(), test_user, loot):
            message = await start_failing(make_kernelspec, master_config(master, mode), error)
        if mode == "always":
            assert f"served by uid {pwd.getpwnam(test_user).pw_uid}" in message
        assert not loot.exists()  # not a byte
        assert logins(daemon) == 0
    finally:
        master.close()
        shutil.rmtree(shared, ignore_errors=True)


async def test_the_cli_checks_for_a_master_and_installs_a_kernelspec_that_needs_one(
    second_factor_host: tuple[SSHDaemon, SecondFactor], master: Master, tmp_path: Path
) -> None:
    daemon, _ = second_factor_host
    common = ["--connect-option", f"config={json.dumps([str(master.config)])}"]
    common += ["--python", sys.executable]
    no_master = cli("check", "--host", ALIAS, *common, "--json")
    assert no_master.returncode == 1
    checks = json.loads(no_master.stdout)[0]["checks"]
    opening = f"ssh -F {master.config} -fN {ALIAS}"
    assert checks["master"]["detail"] == f"no master running; open one with `{opening}`"
    assert checks["auth"]["status"] == "FAIL"  # its own login met the second factor
    master.open()
    checked = cli("check", "--host", ALIAS, *common)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"uses the OpenSSH master at {master.control_path()}" in checked.stdout
    env = {"JUPYTER_PATH": str(tmp_path / "share" / "jupyter")}
    installed = cli(
        "install", "login-py", "--host", ALIAS, "--control-master", "always",
        "--prefix", str(tmp_path), *common, env=env,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    spec = json.loads((tmp_path / "share/jupyter/kernels/login-py/kernel.json").read_text())
    assert spec["metadata"]["kernel_provisioner"]["config"]["use_control_master"] == "always"
    ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "share/jupyter/kernels")])
    km = AsyncKernelManager(kernel_name="login-py", kernel_spec_manager=ksm)
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=30)
        out, _ = await execute(kc, "print('on the login node')")
        assert out.strip() == "on the login node"
    finally:
        kc.stop_channels()
        await km.shutdown_kernel()
    assert logins(daemon) == 1


@contextlib.contextmanager
def users_own_sessions(master: Master, count: int) -> Iterator[Callable[[], int]]:
    """``count`` sessions the user runs through the master (shells, say); yields how
    many of them run on the host."""
    marker = f"sshp-user-session-{secrets.token_hex(4)}"
    command = shlex.join([sys.executable, "-c", "import time; time.sleep(300)", marker])
    argv = ["ssh", "-F", str(master.config), "-o", "BatchMode=yes", ALIAS, "exec " + command]
    null = subprocess.DEVNULL
    clients = [subprocess.Popen(argv, stdin=null, stdout=null, stderr=null) for _ in range(count)]
    on_the_host = b"\0" + marker.encode()  # an argv of its own there; not in the ssh clients'
    try:
        yield lambda: len(cmdlines_containing(on_the_host))
    finally:
        for client in clients:
            client.kill()
            client.wait()
        for pid in cmdlines_containing(on_the_host):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def test_a_spare_yields_its_session_when_the_users_own_fill_the_rest(
    make_kernelspec: KernelSpecFactory,
    second_factor_host: tuple[SSHDaemon, SecondFactor],
    master: Master,
) -> None:
    """MaxSessions 10: a kernel's spare launcher holds one session and the user's own
    nine sessions hold the rest. The next start, with another remote_python (so the
    spare is not its own), takes the spare's session."""
    daemon, _ = second_factor_host
    master.open()
    config = master_config(master)
    pool = get_engine().pool
    async with running_kernel(make_kernelspec, config):
        await wait_until(
            lambda: any(e.spares for es in pool._entries.values() for e in es), 10, "a spare"
        )
        with users_own_sessions(master, 9) as running:
            await wait_until(lambda: running() == 9, 20, "the user's nine sessions")
            other_python = {**config, "remote_python": str(Path(sys.executable).parent / "python3")}
            async with running_kernel(make_kernelspec, other_python) as (_, kc):
                out, _ = await execute(kc, "print('fits')")
                assert out.strip() == "fits"
    assert logins(daemon) == 1


async def test_concurrent_starts_at_max_sessions_all_succeed(
    make_kernelspec: KernelSpecFactory,
    second_factor_host: tuple[SSHDaemon, SecondFactor],
    master: Master,
) -> None:
    """Three sessions free (the user's own seven hold the rest of MaxSessions 10): five
    kernels started at once, ten times (a restored workspace does this), all start:
    a refusal that overtakes our own requests in flight waits, as any other.  (Ten
    rounds, 50 concurrent starts through the full master, within CI's time budget;
    it was twenty.)"""
    daemon, _ = second_factor_host
    master.open()
    config = master_config(master, pool_idle_timeout=0)
    with users_own_sessions(master, 7) as running:
        await wait_until(lambda: running() == 7, 20, "the user's seven sessions")
        for _ in range(10):
            managers = []
            for _ in range(5):
                ksm, name = make_kernelspec(config)
                managers.append(AsyncKernelManager(kernel_name=name, kernel_spec_manager=ksm))
            started = await asyncio.gather(
                *(km.start_kernel() for km in managers), return_exceptions=True
            )
            await asyncio.gather(
                *(km.shutdown_kernel(now=True) for km in managers if km.has_kernel)
            )
            for km in managers:
                await km.cleanup_resources()
            failures = [result for result in started if isinstance(result, BaseException)]
            assert failures == []
    assert logins(daemon) == 1


async def test_another_process_reattaches_through_the_master(
    make_kernelspec: KernelSpecFactory,
    second_factor_host: tuple[SSHDaemon, SecondFactor],
    master: Master,
    tmp_path: Path,
) -> None:
    """A server that crashed, and the next one taking its kernel over, both through the
    user's master: the new process proves itself to the launcher over its relay."""
    daemon, _ = second_factor_host
    master.open()
    ksm, name = make_kernelspec(master_config(master, orphan_timeout=60.0))
    saved = tmp_path / "provisioner-info.json"
    subprocess.run(
        [sys.executable, "-c", PROCESS_A, ksm.kernel_dirs[0], name, str(saved), "disabled"],
        check=True, timeout=120,
    )  # fmt: skip
    info = json.loads(saved.read_text())
    assert process_alive(info["pid"])  # orphaned, waiting to be reattached
    km = await take_over(ksm, name, info)
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=30)
        out, _ = await execute(kc, "print(secret)")
        assert out.strip() == "kept across processes"
        await interrupt_a_running_cell(km, kc)
    finally:
        kc.stop_channels()
        await km.shutdown_kernel()
    assert not process_alive(info["pid"])
    assert logins(daemon) == 1


def test_the_sync_kernel_manager_through_the_master(
    make_kernelspec: KernelSpecFactory,
    second_factor_host: tuple[SSHDaemon, SecondFactor],
    master: Master,
) -> None:
    daemon, _ = second_factor_host
    master.open()
    ksm, name = make_kernelspec(master_config(master))
    km = KernelManager(kernel_name=name, kernel_spec_manager=ksm)
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=30)
        reply = kc.execute_interactive("print('blocking client')", timeout=30)
        assert reply["content"]["status"] == "ok"
        km.restart_kernel()
        kc.wait_for_ready(timeout=30)
        reply = kc.execute_interactive("1 + 1", timeout=30)
        assert reply["content"]["status"] == "ok"
    finally:
        kc.stop_channels()
        km.shutdown_kernel()
    assert logins(daemon) == 1


@pytest.fixture
def bastion_with_a_master(
    tmp_path: Path, client_key: tuple[Path, str]
) -> Iterator[tuple[SSHDaemon, SSHDaemon, Master]]:
    """A bastion that asks for a second factor, in front of a host only it reaches
    (the loopback of their network namespace); the user's master is for the bastion."""
    factor = SecondFactor(tmp_path / "factor")
    with namespace_host() as link:
        bastion = start_sshd(
            tmp_path / "bastion", link.address, client_key[1] + "\n",
            netns=link.namespace, bind_mounts={"/etc/pam.d/sshd": factor.pam},
            extra_config=MFA_SSHD_CONFIG,
        )  # fmt: skip
        try:
            target = start_sshd(
                tmp_path / "behind", "127.0.0.1", client_key[1] + "\n",
                netns=link.namespace, hostname="behind-the-bastion",
            )  # fmt: skip
            master = Master(tmp_path / "user", bastion, client_key[0], factor, "bastion")
            with master.config.open("a") as config:
                config.write(
                    f"Host behind\n  HostName 127.0.0.1\n  Port {target.port}\n  User root\n"
                    f"  IdentityFile {client_key[0]}\n  IdentitiesOnly yes\n"
                    f"  UserKnownHostsFile {tmp_path / 'known_hosts'}\n  ProxyJump bastion\n"
                )
            (tmp_path / "known_hosts").write_text(
                bastion.known_hosts_line() + "\n" + target.known_hosts_line() + "\n"
            )
            try:
                yield bastion, target, master
            finally:
                master.close()
                target.stop()
        finally:
            bastion.stop()


async def test_a_jump_through_the_bastions_master(
    make_kernelspec: KernelSpecFactory,
    bastion_with_a_master: tuple[SSHDaemon, SSHDaemon, Master],
    tmp_path: Path,
) -> None:
    """`ProxyJump bastion`, and a master for the bastion: as with `ssh behind`, the hop
    goes through the master (no second factor asked again), and the provisioner logs in
    to the host behind it with its key."""
    bastion, target, master = bastion_with_a_master
    master.open()
    config = {
        **master_config(master, "auto"),
        "hosts": ["behind"],
        "connect_options": {
            "config": [str(master.config)],
            "agent_path": "",
            "known_hosts": str(tmp_path / "known_hosts"),
        },
    }
    async with running_kernel(make_kernelspec, config) as (km, kc):
        out, _ = await execute(kc, "import socket; print(socket.gethostname())")
        assert out.strip() == "behind-the-bastion"
        await interrupt_a_running_cell(km, kc)
    assert logins(bastion) == 1  # the master's own
    assert target.log().count("Accepted publickey for root") == 1


async def test_the_oldest_host_python_through_the_master_with_ipc(
    make_kernelspec: KernelSpecFactory,
    second_factor_host: tuple[SSHDaemon, SecondFactor],
    master: Master,
) -> None:
    """The launcher's part of the master path (leaving its session, the relay on a port
    for an ipc kernel, the supervision bridge) runs on the host's Python: on 3.6 too."""
    daemon, _ = second_factor_host
    python, site = host_python("3.6")
    master.open()
    config = master_config(master, remote_python=python, remote_transport="ipc")
    async with running_kernel(make_kernelspec, config, env={"PYTHONPATH": str(site)}) as (
        km,
        kc,
    ):
        out, _ = await execute(kc, "import sys; print(sys.version_info[:2])")
        assert out.strip() == "(3, 6)"
        info = await km.provisioner.get_provisioner_info()
        assert all(isinstance(e, str) for e in info["endpoints"].values())  # ipc
        assert isinstance(info["handshake"]["relay"], int)  # reached with a stdio forward
        await interrupt_a_running_cell(km, kc)
        await km.restart_kernel()
        await kc.wait_for_ready(timeout=60)
        out, _ = await execute(kc, "print('restarted')")
        assert out.strip() == "restarted"
    assert logins(daemon) == 1
