"""KernelPorts: a kernel's five local ports, bound once and kept for its whole life.

Each port is a listener on 127.0.0.1 that this process owns from the first start to the
final cleanup, through restarts and lost connections.  An accepted connection is relayed
over an SSH channel (on the kernel's pooled connection) to the kernel's endpoint of the
moment.  While there is none (the host is unreachable, the kernel is restarting) the
connection is *held*: accepted, not read, and relayed as soon as the kernel is back.
So no other local process can take a port during a blip, clients are never refused, and
the ports in ``connection_info`` never change.

The ports the kernel opens on the host itself (a dashboard) are forwarded the same way
(``forward``): one more listener whose connections are streams to the relay, held and
resumed like the kernel's channels, and closed with the kernel (``unforward``).

When the kernel comes back, IOPub goes first: the other channels' first messages wait
until the kernel has sent a message to every IOPub client connected before (ipykernel
>= 7 welcomes each new subscriber, JEP 65), or ``IOPUB_FIRST_BOUND`` passes.  A PUB
socket sends only to subscribers it knows, so a request relayed after that gets all of
its output.  (Seeing the client's subscription go out is not enough: the kernel's PUB
socket takes it in only at a later send, and the first output can miss it.)  Their
channels open and their ZMTP handshakes run meanwhile: over a wide-area link that is
four round trips the first request no longer waits for.

A kernel that stops listening (it is ending: a restart, a shutdown) gets its new
streams refused by the relay (``wire.NOT_LISTENING``): the ports then hold every new
connection for the next kernel, instead of closing it and having its ZMQ socket
reconnect at once, again and again, to a relay that can only refuse it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections import defaultdict

from .errors import TunnelError
from .host.wire import CHANNELS
from .streams import LOCAL_ADDRESS, ClientStream, StreamState, Target

log = logging.getLogger(__name__)

IOPUB_FIRST_BOUND = 1.5  # seconds other channels wait for IOPub's clients at most
MAX_HELD_PER_PORT = 32  # older held connections are closed (their clients reconnect)
# Connections a port relays at once (as the launcher's relay: STREAMS_PER_CHANNEL_MAX):
# another local user's flood of idle connections must not become as many SSH channels
# and launcher sockets.  Past it a new connection is closed, and the log says why.
MAX_STREAMS_PER_PORT = 64
REFUSAL_LOG_INTERVAL = 60.0  # seconds between two log lines about refused connections
GATED = frozenset(CHANNELS) - {"iopub"}  # wait for IOPub's clients after a kernel is back


_OPEN_PORTS: weakref.WeakSet[KernelPorts] = weakref.WeakSet()


async def close_open_ports() -> None:
    """Unbind every kernel's local ports (the engine closes: its loop serves them)."""
    await asyncio.gather(*(ports.aclose() for ports in list(_OPEN_PORTS)), return_exceptions=True)


class KernelPorts:
    """The kernel's local ports and the streams accepted on them.

    ``relay_to(target)`` points them at a kernel.  ``suspend()`` says its connection was
    lost: streams keep their place and resume when the same launcher is relayed to again.
    ``detach()`` takes the kernel away for good (restart, shutdown): streams close, their
    clients reconnect and are held.  ``aclose()`` unbinds.  Runs on the engine's loop."""

    def __init__(self) -> None:
        self._servers: dict[str, asyncio.Server] = {}
        self._held: defaultdict[str, list[ClientStream]] = defaultdict(list)
        self._relayed: set[ClientStream] = set()
        self._suspended: set[ClientStream] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._target: Target | None = None
        self._launcher = ""  # the launcher that holds the suspended streams' streams
        self._gate_open = False
        self._gate_timer: asyncio.TimerHandle | None = None
        self._iopub_expected = 0
        self._iopub_subscribed = 0
        self._refusals_logged: dict[str, float] = {}  # channel: when
        self.spares: dict[str, ClientStream] = {}  # a proven channel for the next client

    @classmethod
    async def open(cls, preferred: dict[str, int] | None = None) -> KernelPorts:
        """Bind the five ports: ``preferred`` ones where free (a kernel taken over from
        another process keeps its ports), new ones otherwise."""
        ports = cls()
        loop = asyncio.get_running_loop()
        _OPEN_PORTS.add(ports)
        try:
            for channel in CHANNELS:
                wanted = (preferred or {}).get(channel, 0)

                def protocol(channel: str = channel) -> ClientStream:
                    return ports.spares.pop(channel, None) or ClientStream(ports, channel)

                try:
                    server = await loop.create_server(protocol, LOCAL_ADDRESS, wanted)
                except OSError as exc:
                    if not wanted:
                        raise TunnelError(f"cannot bind a local port for {channel}: {exc}") from exc
                    log.warning(
                        "local port %d (%s) is taken: %s; using a new one", wanted, channel, exc
                    )
                    server = await loop.create_server(protocol, LOCAL_ADDRESS, 0)
                ports._servers[channel] = server
        except BaseException:
            await asyncio.shield(ports.aclose())
            raise
        return ports

    @property
    def numbers(self) -> dict[str, int]:
        """The kernel's five channels' local ports."""
        return {channel: self._port_of(channel) for channel in CHANNELS if channel in self._servers}

    def _port_of(self, channel: str) -> int:
        port: int = self._servers[channel].sockets[0].getsockname()[1]
        return port

    async def forward(self, channel: str, bind: str, wanted: int) -> int:
        """Listen on ``bind`` for ``channel`` (a port the kernel opened: ``tcp:PORT``) on
        port ``wanted`` if it is free, else on a free one; the local port."""
        if channel in self._servers:
            return self._port_of(channel)
        loop = asyncio.get_running_loop()

        def protocol() -> ClientStream:
            return ClientStream(self, channel)

        try:
            server = await loop.create_server(protocol, bind, wanted)
        except OSError:
            server = await loop.create_server(protocol, bind, 0)
        if not self._servers:  # closed meanwhile
            server.close()
            raise TunnelError("the kernel's ports are closed")
        self._servers[channel] = server
        return self._port_of(channel)

    def unforward(self, channel: str) -> None:
        """Stop forwarding ``channel``: its listener and its streams close."""
        server = self._servers.pop(channel, None)
        if server is None:
            return
        server.close()
        for stream in [*self._relayed, *self._suspended, *self._held.pop(channel, [])]:
            if stream.channel == channel:
                stream.close()

    @property
    def forwarded(self) -> list[str]:
        return [channel for channel in self._servers if channel not in CHANNELS]

    def prepare(self, target: Target) -> None:
        """The kernel's relay listens and the kernel is starting: open and prove a
        channel for each of its ports now, so that its first client, once the kernel is
        ready (``relay_to``), only has to send."""
        if self._target is not None or not self._servers:
            return
        for channel in CHANNELS:
            if channel in self.spares:
                continue
            spare = self.spares[channel] = ClientStream(self, channel)
            spare.spare = spare.parked = True
            self._relay(spare, target)

    def took_spare(self, stream: ClientStream) -> None:
        """A client connected to a spare's port and took it."""
        target = self._target
        early = stream.target
        if target is not None and early is not None and early.launcher == target.launcher:
            stream.gated = stream.channel in GATED and not self._gate_open
            stream.unpark()

    def relay_to(self, target: Target) -> None:
        """Relay to ``target`` from now on.  Suspended streams resume on the launcher that
        holds their streams.  New streams: IOPub first, the rest once the kernel has sent
        IOPub's clients a message (so it knows them as subscribers)."""
        suspended, self._suspended = self._suspended, set()
        if target.launcher != self._launcher:
            for stream in suspended:
                stream.close()
            suspended = set()
        self._target, self._launcher = target, target.launcher
        for stream in suspended:
            stream.resumes_alone = 0
            self._relay(stream, target, resume=True)
        self._iopub_subscribed = 0
        # IOPub clients already waiting (reconnected while the kernel was away) count too
        self._iopub_expected = max(self._iopub_expected, len(self._held["iopub"]))
        if self._iopub_expected:
            self._gate_open = False
            self._gate_timer = asyncio.get_running_loop().call_later(
                IOPUB_FIRST_BOUND, self._open_gate
            )
        else:
            self._gate_open = True
        for channel, spare in list(self.spares.items()):  # a held client takes its port's spare
            early = spare.target
            held = self._held[channel]
            same = early is not None and early.launcher == target.launcher
            if held and same and spare.take_client(held[0]):
                del self.spares[channel]
        for channel in list(self._held):
            self._relay_held(channel)  # gated ones send only their ZMTP handshake
        for stream in list(self._relayed):  # spares, taken before the kernel was ready or not
            if stream.parked and stream.target is not None:
                if stream.target.launcher != target.launcher:
                    stream.close()
                elif not stream.spare:
                    stream.gated = stream.channel in GATED and not self._gate_open
                    stream.unpark()

    def suspend(self) -> None:
        """The kernel's connection is lost: its streams are kept (the relay on
        the host keeps its side), and new streams are held."""
        self._target = None
        self._close_gate()
        for task in self._tasks:
            task.cancel()
        for stream in list(self._relayed):
            stream.suspend()
            self._relayed.discard(stream)
            if stream.state is StreamState.SUSPENDED:
                self._suspended.add(stream)
            elif stream.state is StreamState.HELD:
                self.hold(stream)

    def detach(self) -> None:
        """The kernel is gone for good: close its streams; new ones are held."""
        self._target = None
        self._close_gate()
        streams = [*self._relayed, *self._suspended]
        iopub_clients = sum(1 for stream in streams if stream.channel == "iopub")
        # A kernel gone while still waiting for IOPub's clients keeps waiting for all of them.
        self._iopub_expected = max(self._iopub_expected, iopub_clients)
        for stream in streams:
            stream.close()
        self._suspended.clear()
        self._launcher = ""
        for task in self._tasks:
            task.cancel()

    async def aclose(self) -> None:
        _OPEN_PORTS.discard(self)
        self.detach()
        servers, self._servers = self._servers, {}
        for server in servers.values():
            server.close()
        for streams in self._held.values():
            for stream in list(streams):
                stream.close()
        tasks = list(self._tasks)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for server in servers.values():
            with contextlib.suppress(OSError):
                await asyncio.wait_for(server.wait_closed(), 5.0)

    # -- called by streams -----------------------------------------------------------------

    def accepted(self, stream: ClientStream) -> None:
        if not self._servers:
            stream.close()
        elif self._streams_on(stream.channel) >= MAX_STREAMS_PER_PORT:
            self.refused(stream, f"the port already relays {MAX_STREAMS_PER_PORT} connections")
        elif self._target is not None:
            self._relay(stream, self._target)
        else:
            self.hold(stream)

    def _streams_on(self, channel: str) -> int:
        live = self._relayed | self._suspended
        return len(self._held[channel]) + sum(1 for stream in live if stream.channel == channel)

    def refused(self, stream: ClientStream, why: str) -> None:
        """Close a connection the kernel's side cannot take: said once a minute per port
        (a flood of connections must not flood the log too)."""
        now = time.monotonic()
        if now - self._refusals_logged.get(stream.channel, -REFUSAL_LOG_INTERVAL) >= (
            REFUSAL_LOG_INTERVAL
        ):
            self._refusals_logged[stream.channel] = now
            label = self._target.label if self._target is not None else "the kernel"
            log.error("%s: refused a new %s connection: %s", label, stream.channel, why)
        stream.close()

    def hold(self, stream: ClientStream) -> None:
        self._relayed.discard(stream)
        held = self._held[stream.channel]
        held.append(stream)
        if len(held) > MAX_HELD_PER_PORT:
            held[0].close()

    def not_listening(self, stream: ClientStream) -> None:
        """The kernel no longer listens (it is ending): hold this connection and every
        new one for its next start (a restart), until then or the ports close."""
        target = self._target
        if (
            target is not None
            and stream.target is not None
            and stream.target.launcher == target.launcher
        ):
            log.debug("%s: not listening; holding new connections", target.label)
            self._target = None
            self._close_gate()
        self.hold(stream)

    def subscribed(self, stream: ClientStream) -> None:
        self._iopub_subscribed += 1
        if not self._gate_open and self._iopub_subscribed >= self._iopub_expected:
            self._open_gate()

    def suspended(self, stream: ClientStream) -> None:
        """A stream lost its channel on its own (not with the connection): it resumes on
        the current target once; a stream the relay no longer has then ends."""
        self._relayed.discard(stream)
        target = self._target
        if target is not None and not target.connection.is_closed() and stream.may_resume_alone:
            stream.resumes_alone += 1
            self._relay(stream, target, resume=True)
        else:
            self._suspended.add(stream)

    def forget(self, stream: ClientStream) -> None:
        if self.spares.get(stream.channel) is stream:
            del self.spares[stream.channel]
        self._relayed.discard(stream)
        self._suspended.discard(stream)
        with contextlib.suppress(ValueError):
            self._held[stream.channel].remove(stream)

    # -- internals -----------------------------------------------------------------------

    def _close_gate(self) -> None:
        self._gate_open = False
        if self._gate_timer is not None:
            self._gate_timer.cancel()
            self._gate_timer = None

    def _open_gate(self) -> None:
        if self._gate_timer is not None:
            self._gate_timer.cancel()
            self._gate_timer = None
        if self._target is None or self._gate_open:
            return
        if self._iopub_subscribed < self._iopub_expected:
            log.info(
                "%d of %d IOPub clients back after %gs; relaying the other channels",
                self._iopub_subscribed, self._iopub_expected, IOPUB_FIRST_BOUND,
            )  # fmt: skip
        self._gate_open = True
        self._iopub_expected = 0
        for stream in list(self._relayed):
            stream.ungate()

    def _relay_held(self, channel: str) -> None:
        held, self._held[channel] = self._held[channel], []
        for stream in held:
            if self._target is not None:
                self._relay(stream, self._target)

    def _relay(self, stream: ClientStream, target: Target, resume: bool = False) -> None:
        stream.gated = not resume and stream.channel in GATED and not self._gate_open
        self._relayed.add(stream)
        task = asyncio.ensure_future(stream.relay(target, resume))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
