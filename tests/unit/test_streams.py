"""The fast tier: the kernel's local ports (``tunnels.KernelPorts``) and the host's real
relay (``host/relay.Relay``, in this process), joined by plain local sockets where an
SSH connection would be.  Holding, relaying, a cut and a resume, in seconds and
without sshd: the logic the integration tests exercise through real SSH."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from ssh_provisioner.host.relay import Relay
from ssh_provisioner.host.spec import LaunchSpec
from ssh_provisioner.streams import Target
from ssh_provisioner.tunnels import KernelPorts

from ..local_link import LocalLink

TOKEN = "0123456789abcdef0123456789abcdef"  # noqa: S105  (a test token)
S = TypeVar("S")
DEADLINE = 10.0


class EchoKernel:
    """A kernel endpoint that sends back what it gets, and can send on its own."""

    def __init__(self) -> None:
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.AbstractServer | None = None

    async def serve(self, path: str) -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.writers.append(writer)
            while data := await reader.read(65536):
                writer.write(data)

        self.server = await asyncio.start_unix_server(handle, path)


@contextlib.asynccontextmanager
async def rig(tmp_path: Path) -> AsyncIterator[tuple[KernelPorts, Relay, EchoKernel]]:
    kernel = EchoKernel()
    await kernel.serve(str(tmp_path / "shell"))
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    spec = LaunchSpec(
        {"argv": ["k"], "kernel_id": "k", "attach_token": TOKEN, "connection": {"key": "x"}}
    )
    relay = Relay(spec, "ipc", {"shell": str(tmp_path / "shell")}, str(runtime))
    ports = await KernelPorts.open()
    try:
        yield ports, relay, kernel
    finally:
        await ports.aclose()
        relay.close()
        await asyncio.to_thread(relay.thread.join, 5)
        assert kernel.server is not None
        kernel.server.close()
        for writer in kernel.writers:
            writer.close()


def target(link: LocalLink, relay: Relay) -> Target:
    return Target(link, str(relay.address), TOKEN, "launcher-1", "kernel k")


async def read_exactly(reader: asyncio.StreamReader, size: int) -> bytes:
    return await asyncio.wait_for(reader.readexactly(size), DEADLINE)


@pytest.mark.asyncio
async def test_a_client_held_before_the_kernel_is_relayed_once_it_is(tmp_path: Path) -> None:
    async with rig(tmp_path) as (ports, relay, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", ports.numbers["shell"])
        writer.write(b"sent while no kernel was there")
        await writer.drain()
        ports.relay_to(target(LocalLink(), relay))
        assert await read_exactly(reader, 30) == b"sent while no kernel was there"
        writer.close()


@pytest.mark.asyncio
async def test_a_cut_loses_and_repeats_nothing_either_way(tmp_path: Path) -> None:
    async with rig(tmp_path) as (ports, relay, kernel):
        first = LocalLink()
        ports.relay_to(target(first, relay))
        reader, writer = await asyncio.open_connection("127.0.0.1", ports.numbers["shell"])
        writer.write(b"before ")
        assert await read_exactly(reader, 7) == b"before "

        first.cut()  # the connection is lost; the session then says so
        ports.suspend()
        writer.write(b"client-during ")  # held here until the stream resumes
        await writer.drain()
        kernel.writers[0].write(b"kernel-during ")  # held by the relay on the host
        await kernel.writers[0].drain()

        ports.relay_to(target(LocalLink(), relay))  # the same launcher, a new connection
        got = await read_exactly(reader, len(b"kernel-during client-during "))
        assert sorted([got[:14], got[14:]]) == sorted([b"kernel-during ", b"client-during "])
        writer.write(b"after")
        assert await read_exactly(reader, 5) == b"after"
        assert len(kernel.writers) == 1  # one stream throughout: the kernel saw no reconnect
        writer.close()


@pytest.mark.asyncio
async def test_a_new_launcher_ends_the_old_streams_and_relays_new_clients(
    tmp_path: Path,
) -> None:
    async with rig(tmp_path) as (ports, relay, _):
        first = LocalLink()
        ports.relay_to(target(first, relay))
        reader, writer = await asyncio.open_connection("127.0.0.1", ports.numbers["shell"])
        writer.write(b"x")
        assert await read_exactly(reader, 1) == b"x"
        first.cut()
        ports.suspend()
        restarted = Target(LocalLink(), str(relay.address), TOKEN, "launcher-2", "kernel k")
        ports.relay_to(restarted)
        assert await asyncio.wait_for(reader.read(), DEADLINE) == b""  # closed: reconnect
        again_reader, again = await asyncio.open_connection("127.0.0.1", ports.numbers["shell"])
        again.write(b"new")
        assert await read_exactly(again_reader, 3) == b"new"
        again.close()
        writer.close()


GREETING = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x01" + b"NULL".ljust(20, b"\x00") + b"\x00" * 32
READY = bytes([0x04, 6]) + bytes([5]) + b"READY"
MESSAGE = bytes([0x00, 5]) + b"hello"  # one frame: the kernel's welcome


@pytest.mark.asyncio
async def test_after_a_restart_other_channels_wait_for_iopubs_clients(tmp_path: Path) -> None:
    """A PUB socket sends only to subscribers it knows: a request relayed before the new
    kernel has sent IOPub's client a message could lose its output (see tunnels).  The
    request's ZMTP handshake goes meanwhile: only its first message waits."""
    welcome = asyncio.Event()

    async def iopub(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await welcome.wait()
        writer.write(GREETING + READY + MESSAGE)
        await reader.read()
        writer.close()

    server = await asyncio.start_unix_server(iopub, str(tmp_path / "iopub"))
    async with rig(tmp_path) as (ports, relay, _):
        relay.endpoints["iopub"] = str(tmp_path / "iopub")
        ports.relay_to(target(LocalLink(), relay))
        before = await asyncio.open_connection("127.0.0.1", ports.numbers["iopub"])
        ports.detach()  # a restart: the client's connection closes, and it comes back
        assert await asyncio.wait_for(before[0].read(), DEADLINE) == b""
        before[1].close()
        subscriber = await asyncio.open_connection("127.0.0.1", ports.numbers["iopub"])
        subscriber[1].write(GREETING[:10])  # a ZMQ peer speaks first: its signature
        restarted = Target(LocalLink(), str(relay.address), TOKEN, "launcher-2", "kernel k")
        ports.relay_to(restarted)
        reader, writer = await asyncio.open_connection("127.0.0.1", ports.numbers["shell"])
        request = bytes([0x00, 7]) + b"request"
        writer.write(GREETING + READY + request)
        handshake = await read_exactly(reader, len(GREETING + READY))  # the echo kernel's
        assert handshake == GREETING + READY
        with pytest.raises(TimeoutError):  # held: IOPub's client has not been welcomed
            await asyncio.wait_for(reader.readexactly(len(request)), 0.5)
        welcome.set()
        greeted = await read_exactly(subscriber[0], len(GREETING + READY + MESSAGE))
        assert greeted.endswith(b"hello")
        assert await read_exactly(reader, len(request)) == request
        writer.close()
        subscriber[1].close()
    server.close()


class CountingLink(LocalLink):
    """A LocalLink that counts the channels opened to the relay."""

    def __init__(self) -> None:
        super().__init__()
        self.opened = 0

    async def open_unix(self, factory: Callable[[], S], path: str) -> S:
        self.opened += 1
        return await super().open_unix(factory, path)


@pytest.mark.asyncio
async def test_channels_proven_while_the_kernel_starts_carry_its_first_clients(
    tmp_path: Path,
) -> None:
    """The relay listens before the kernel does: each port opens and proves a channel
    then, and the first client of a port, once the kernel is ready, only has to send
    (over a long link, two round trips that no request waits for)."""
    async with rig(tmp_path) as (ports, relay, kernel):
        link = CountingLink()
        ports.prepare(target(link, relay))
        deadline = asyncio.get_running_loop().time() + DEADLINE
        while sum(1 for each in relay.links if each.phase == "proven") < 5:
            assert asyncio.get_running_loop().time() < deadline, "the spares were not proven"
            await asyncio.sleep(0.01)
        assert not kernel.writers  # nothing reached the kernel: no client yet
        ports.relay_to(target(link, relay))  # the kernel is ready
        reader, writer = await asyncio.open_connection("127.0.0.1", ports.numbers["shell"])
        writer.write(b"the first request")
        assert await read_exactly(reader, 17) == b"the first request"
        assert link.opened == 5  # the client took its port's spare: no channel of its own
        writer.close()


@pytest.mark.asyncio
async def test_a_client_held_through_a_restart_takes_its_ports_spare(tmp_path: Path) -> None:
    """A client that reconnected while the kernel restarted is held; once the new
    kernel is ready it goes out on the channel its port proved meanwhile."""
    async with rig(tmp_path) as (ports, relay, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", ports.numbers["shell"])
        writer.write(b"sent during the restart")
        await writer.drain()
        link = CountingLink()
        ports.prepare(target(link, relay))  # the new kernel's relay listens
        deadline = asyncio.get_running_loop().time() + DEADLINE
        while sum(1 for each in relay.links if each.phase == "proven") < 5:
            assert asyncio.get_running_loop().time() < deadline, "the spares were not proven"
            await asyncio.sleep(0.01)
        ports.relay_to(target(link, relay))
        assert await read_exactly(reader, 23) == b"sent during the restart"
        assert link.opened == 5
        writer.write(b" and after")
        assert await read_exactly(reader, 10) == b" and after"
        writer.close()
