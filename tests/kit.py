"""The test kit: what several test modules use (test modules never import each other:
tests/unit/test_layout.py keeps it so).  Kernels, cells, clients in subprocesses, the
CLI, a link cut, a takeover by another process, host Pythons."""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.asynchronous import AsyncKernelClient
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from jupyter_client.provisioning import KernelProvisionerFactory

from .conftest import IN_CI, KernelSpecFactory
from .helpers import execute, wait_until
from .netns import Link


@asynccontextmanager
async def running_kernel(
    make_kernelspec: KernelSpecFactory,
    config: dict[str, Any],
    manager_class: type[AsyncKernelManager] = AsyncKernelManager,
    manager_options: dict[str, Any] | None = None,
    **spec: Any,
) -> AsyncIterator[tuple[AsyncKernelManager, AsyncKernelClient]]:
    ksm, name = make_kernelspec(config, **spec)
    km = manager_class(kernel_name=name, kernel_spec_manager=ksm, **(manager_options or {}))
    km.shutdown_wait_time = 4.0
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=30)
        yield km, kc
    finally:
        kc.stop_channels()
        # also when the kernel is already gone: shutdown_kernel runs cleanup_resources
        if not km.context.closed:  # unless the test shut it down itself
            await km.shutdown_kernel()


async def kernel_pid(kc: AsyncKernelClient) -> int:
    out, _ = await execute(kc, "import os; print(os.getpid())")
    return int(out)


BIN = Path(sys.executable).parent


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "ssh-provisioner"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


def option_args(options: dict[str, Any]) -> list[str]:
    args = []
    for key, value in options.items():
        args += ["--connect-option", f"{key}={json.dumps(value)}"]
    return args


HOST_PYTHONS = ("3.6", "3.7", "3.8", "3.9", "3.10", "3.11", "3.12", "3.13")


HOSTPY_DIR = Path(__file__).resolve().parents[1] / ".hostpy"


def pyenv_root() -> Path:
    root = os.environ.get("PYENV_ROOT")
    if not root:
        try:
            root = subprocess.run(
                ["pyenv", "root"], capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            root = str(Path.home() / ".pyenv")
    return Path(root)


def host_python(minor: str) -> tuple[str, Path]:
    """(interpreter, its ipykernel dir), or fail (CI) / skip (elsewhere)."""
    versions = sorted(
        pyenv_root().glob(f"versions/{minor}.*/bin/python{minor}"),
        key=lambda p: [int(part) for part in p.parts[-3].split(".") if part.isdigit()],
    )
    site = HOSTPY_DIR / minor
    problem = None
    if not versions:
        problem = f"no Python {minor} under {pyenv_root()}/versions"
    elif not (site / ".done").is_file():
        problem = f"no ipykernel for Python {minor} in {site}: run .ci/host-pythons"
    if problem:
        if IN_CI:
            pytest.fail(problem)
        pytest.skip(problem)
    return str(versions[-1]), site


LINES = 200


def counting_cell(interval: float) -> str:
    return (
        "import time\n"
        f"for i in range({LINES}):\n"
        "    print(i, flush=True)\n"
        f"    time.sleep({interval})\n"
    )


OUTAGE = 12.0  # seconds the link is down, from the cut


def resilient(config: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        **config,
        "connect_timeout": 2.0,
        "orphan_timeout": 60.0,
        "reconnect_timeout": 60.0,
        **extra,
    }


async def cut_for(link: Link, km: AsyncKernelManager, seconds: float) -> None:
    """Cut the link (no FIN, no RST), wait for keepalives to notice, restore it
    ``seconds`` after the cut."""
    lease = km.provisioner.seat.session._lease
    link.down()
    cut = time.monotonic()
    await wait_until(lambda: lease.connection.is_closed(), 15, "keepalives to notice the cut")
    assert await km.provisioner.poll() is None  # unreachable, not dead
    await asyncio.sleep(max(0.0, cut + seconds - time.monotonic()))  # the outage itself
    link.up()


Message = dict[str, Any]


async def follow(
    kc: AsyncKernelClient, msg_id: str, messages: list[Message], until: Callable[[Message], bool]
) -> None:
    """Add ``msg_id``'s IOPub messages to ``messages`` until one is ``until``."""
    deadline = time.monotonic() + 60
    while not (messages and until(messages[-1])):
        message = await kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        if message["parent_header"].get("msg_id") == msg_id:
            messages.append(message)


def printed_line(line: int) -> Callable[[Message], bool]:
    return lambda m: m["msg_type"] == "stream" and str(line) in m["content"]["text"].split()


def printing(message: Message) -> bool:
    return bool(message["msg_type"] == "stream")


def idle(message: Message) -> bool:
    return message["msg_type"] == "status" and message["content"]["execution_state"] == "idle"


PROCESS_A = """
import asyncio, json, os, sys
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

async def main():
    ksm = KernelSpecManager(kernel_dirs=[sys.argv[1]])
    km = AsyncKernelManager(
        kernel_name=sys.argv[2], kernel_spec_manager=ksm, transport_encryption=sys.argv[4]
    )
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    await kc.wait_for_ready(timeout=30)
    code = sys.argv[5] if len(sys.argv) > 5 else "secret = 'kept across processes'"
    await kc.execute(code, reply=True, timeout=30)
    info = await km.provisioner.get_provisioner_info()
    info["connection_info"]["key"] = info["connection_info"]["key"].decode()
    with open(sys.argv[3], "w") as f:
        json.dump(info, f)
    os._exit(0)  # gone without a shutdown, as a crashed server would be

asyncio.run(main())
"""


async def take_over(
    ksm: KernelSpecManager, name: str, info: dict[str, Any], **manager_options: Any
) -> AsyncKernelManager:
    """What a new server does with a kernel its crashed predecessor started: a manager
    whose provisioner reattaches with the saved provisioner info."""
    km = AsyncKernelManager(kernel_name=name, kernel_spec_manager=ksm, **manager_options)
    km.kernel_id = info["kernel_id"]
    km.provisioner = KernelProvisionerFactory.instance().create_provisioner_instance(
        info["kernel_id"], km.kernel_spec, parent=km
    )
    await km.provisioner.load_provisioner_info(info)
    km.load_connection_info(km.provisioner.connection_info)
    return km


INTRUDER = """
import json, socket, struct, sys
results = []
host = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1"
for channel, resume in (("iopub", False), ("shell", True)):  # a new stream; a guessed one
    s = socket.create_connection((host, int(sys.argv[1])), timeout=10)
    hello = {"hello": "n", "stream": "s", "channel": channel, "resume": resume, "received": 0}
    s.sendall(json.dumps(hello).encode() + b"\\n")
    s.makefile("rb").readline()  # the relay's nonce and proof
    subscribe = b"\\x00\\x01\\x01"  # what a SUB socket would send
    try:
        s.sendall(json.dumps({"proof": "0" * 64}).encode() + b"\\n"
                  + struct.pack(">cQI", b"D", 0, len(subscribe)) + subscribe)
        # accepted, the kernel's ZMTP greeting (or a resume answer) would come back
        results.append("closed" if s.recv(65536) == b"" else "answered")
    except OSError:
        results.append("closed")
print(" ".join(results))
"""


VENV_BIN = str(Path(sys.executable).parent)


def cli_env(ksm: Any) -> dict[str, str]:
    kernels_dir = Path(ksm.kernel_dirs[0])
    return {
        **os.environ,
        "JUPYTER_PATH": str(kernels_dir.parent),
        "JUPYTER_RUNTIME_DIR": str(kernels_dir.parent / "runtime"),
        "JUPYTER_PLATFORM_DIRS": "1",
        "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
        "PYTHONWARNINGS": "ignore",
    }


# 200 numbered lines over about 10 s: a cut after the first line lasts past the end of
# the cell, so most of its output, its `idle` and its reply are all sent during the cut.
COUNTING_CELL = counting_cell(0.05)


# A web server in a thread of the kernel, serving a fresh temp dir on the host.
def unclaimed_port() -> int:
    """A port free on this machine's loopback and below the ephemeral range.  A host in
    a network namespace has a loopback of its own, where a port free here may already
    be a kernel's or a relay's: they bind port 0 (the ephemeral range) or ZMQ's random
    range (49152 and up), never one below both."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral = int(f.read().split()[0])
    for _ in range(100):
        port = random.randrange(20000, min(ephemeral, 49152))  # noqa: S311 - not a secret
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port below the ephemeral range")


DASHBOARD_CELL = """
import functools, http.server, os, shutil, tempfile, threading
site = tempfile.mkdtemp()
with open(os.path.join(site, "index.html"), "w") as f:
    f.write("served on the host")
with open(os.path.join(site, "big"), "wb") as f:
    f.write(os.urandom({big}))
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=site)
handler.log_message = lambda *args: None
server = http.server.ThreadingHTTPServer(({bind!r}, {port}), handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
print(server.server_address[1])
"""
STOP_DASHBOARD = "server.shutdown(); server.server_close(); shutil.rmtree(site)"
