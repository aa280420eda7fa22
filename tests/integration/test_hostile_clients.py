"""Another user on either end, against the launcher: clients that never read cannot make
it grow, and floods of connections cannot starve it of descriptors or CPU, while the
kernel's own user works on (blips included)."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.session import Session

from ..conftest import KernelSpecFactory, rig_config
from ..helpers import execute
from ..kit import cut_for, resilient, running_kernel
from ..netns import Link
from ..sshd import SSHDaemon

pytestmark = [pytest.mark.sshd, pytest.mark.usefixtures("no_leaks")]

MIB = 1024 * 1024

# Subscribes 16 times to a kernel's IOPub (no key is needed for that), takes one
# message on each (so each is surely subscribed), then never reads again, with the
# smallest buffers it can ask for.
IDLE_SUBSCRIBER = """
import sys, zmq
context = zmq.Context()
sockets = []
for _ in range(16):
    s = context.socket(zmq.SUB)
    s.setsockopt(zmq.RCVHWM, 1)
    s.setsockopt(zmq.RCVBUF, 4096)
    s.setsockopt(zmq.SUBSCRIBE, b"")
    s.connect(sys.argv[1])
    sockets.append(s)
for s in sockets:
    if not s.poll(60000):
        sys.exit("no message within a minute")
    s.recv_multipart()
print("subscribed", flush=True)
sys.stdin.read()
"""

# Holds as many connections to a port as it can open (it raises its own descriptor
# limit first), sending nothing, until its stdin closes.
CONNECTION_HOLDER = """
import resource, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
held = []
for _ in range(int(sys.argv[2])):
    try:
        held.append(socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5))
    except OSError:
        pass
print(len(held), flush=True)
sys.stdin.read()
"""


@contextmanager
def attacker(argv: list[str]) -> Iterator[subprocess.Popen[str]]:
    """A process of another user; ended (by PID) when the block ends."""
    process = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        yield process
    finally:
        process.kill()
        process.communicate(timeout=30)


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture
def root_on_host_a(host_a: SSHDaemon, client_key: tuple[Path, str]) -> dict[str, Any]:
    return rig_config(host_a, client_key[0], launch_timeout=30.0)


async def test_idle_subscriptions_of_another_user_cannot_bloat_the_launcher(
    make_kernelspec: KernelSpecFactory,
    root_on_host_a: dict[str, Any],
    test_user: str,
    tmp_path: Path,
) -> None:
    """16 IOPub subscriptions that never read, opened by another local user, while the
    kernel sends 48 MiB of output and 48 MiB of comm messages (which are never
    dropped): the launcher stays under 256 MiB, and the user's own client gets all."""
    async with running_kernel(make_kernelspec, root_on_host_a) as (km, kc):
        info = await km.provisioner.get_provisioner_info()
        launcher = int(info["launcher_pid"])
        iopub = f"tcp://127.0.0.1:{km.get_connection_info()['iopub_port']}"
        flag = tmp_path / "subscribed"
        ticking = kc.execute(
            "import os, time\n"
            f"while not os.path.exists({str(flag)!r}):\n"
            "    print('tick', flush=True)\n"
            "    time.sleep(0.05)\n"
        )
        argv = ["runuser", "-u", test_user, "--", sys.executable, "-c", IDLE_SUBSCRIBER, iopub]
        with attacker(argv) as subscriber:
            assert subscriber.stdout is not None
            line = await asyncio.wait_for(asyncio.to_thread(subscriber.stdout.readline), 90)
            assert line.strip() == "subscribed", subscriber.stderr
            flag.touch()
            while (await kc.get_shell_msg(timeout=30))["parent_header"]["msg_id"] != ticking:
                pass
            out, reply = await execute(
                kc,
                "import sys, time\n"
                "for i in range(768):\n"
                "    sys.stdout.write(('%08d' % i) * 8192)\n"  # 64 KiB a write, 48 MiB in all
                "    sys.stdout.flush()\n"
                "    time.sleep(0.01)\n",  # over seconds: the idle clients look cut off
                timeout=300,
            )
            assert reply["status"] == "ok"
            assert len(out) == 48 * MIB
            assert out[-8:] == f"{767:08d}"
            received: list[int] = []

            def on_comm(msg: dict[str, Any]) -> None:
                if msg["msg_type"] == "comm_msg":
                    received.append(len(msg["content"]["data"]["chunk"]))

            reply = await kc.execute_interactive(
                "from comm import create_comm\n"
                "c = create_comm(target_name='sshp-flood')\n"
                "import time\n"
                "for _ in range(48):\n"
                "    c.send({'chunk': 'x' * (1 << 20)})\n"
                "    time.sleep(0.1)\n",
                output_hook=on_comm,
                timeout=300,
            )
            assert reply["content"]["status"] == "ok"
            assert received == [MIB] * 48
            peak = status_kib(launcher, "VmHWM") * 1024
            assert peak < 256 * MIB, f"the launcher grew to {peak / MIB:.0f} MiB"
        out, _ = await execute(kc, "print('still mine')")
        assert out.strip() == "still mine"


async def test_floods_of_connections_leave_the_kernel_working(
    make_kernelspec: KernelSpecFactory,
    host_behind_a_link: tuple[Link, dict[str, Any]],
    test_user: str,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    """On a host whose processes may open 1,024 descriptors (a common default), a host
    user holds 1,100 connections to the relay's port, and a local user 600 to the
    kernel's local control port: the user's client works through a blip, a new client
    works (its control connection refused with a logged reason), the launcher stays
    below 10% of a core, and reattaches afterwards."""
    caplog.set_level(logging.INFO)
    link, config = host_behind_a_link
    python = tmp_path / "python-with-1024-descriptors"
    python.write_text(f'#!/bin/sh\nulimit -n 1024\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    config = resilient(config, remote_python=str(python))
    async with running_kernel(make_kernelspec, config) as (km, kc):
        info = await km.provisioner.get_provisioner_info()
        launcher, relay = int(info["launcher_pid"]), int(info["handshake"]["relay"])
        limits = Path(f"/proc/{launcher}/limits").read_text()
        assert re.search(r"Max open files\s+1024\s+1024", limits), limits
        on_host = ["ip", "netns", "exec", link.namespace]
        as_user = ["runuser", "-u", test_user, "--", sys.executable, "-c", CONNECTION_HOLDER]
        control = km.get_connection_info()["control_port"]
        with (
            attacker([*on_host, *as_user, str(relay), "1100"]) as host_flood,
            attacker([*as_user, str(control), "600"]) as local_flood,
        ):
            for flood in (host_flood, local_flood):
                assert flood.stdout is not None
                opened = await asyncio.wait_for(asyncio.to_thread(flood.stdout.readline), 120)
                assert int(opened) > 500, flood.stderr
            before, started = cpu_seconds(launcher), time.monotonic()
            out, _ = await execute(kc, "print('working')")
            assert out.strip() == "working"
            await cut_for(link, km, 3.0)
            out, _ = await execute(kc, "print('after the blip')", timeout=60)
            assert out.strip() == "after the blip"
            # another process's client: a session (and ZMQ identity) of its own
            second = km.client(session=Session(key=km.session.key))
            second.start_channels()
            try:
                out, _ = await execute(second, "print('a new client')", timeout=60)
                assert out.strip() == "a new client"
            finally:
                second.stop_channels()
            await asyncio.sleep(max(0.0, started + 3.0 - time.monotonic()))  # a window to average
            share = (cpu_seconds(launcher) - before) / (time.monotonic() - started)
            assert share < 0.10, f"the launcher used {share:.0%} of a core"
        assert "refused a new control connection" in caplog.text
        out, _ = await execute(kc, "print('after the floods')")
        assert out.strip() == "after the floods"
