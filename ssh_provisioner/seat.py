"""KernelSeat: what a kernel keeps from its first start to its final cleanup.

A kernel has two lifetimes.  A *session* (``KernelSession``) is one launcher and the
kernel process it runs: a restart ends it and starts another.  The *seat* outlives
them: the five local ports its clients connect to, the host slot placement reserved,
the Slurm job a restart runs in again, and the handshake of the session it last had.
The seat owns them from the first start to the final ``release``; ``SSHProvisioner``
is glue between jupyter_client's hooks and it.  Runs on the engine's loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from .custody import cancel_job
from .engine import get_engine
from .handshake import Handshake
from .hosts import HostEntry
from .placement import PlacementRequest, Tries, start_with_failover
from .policies import Placement
from .session import KernelSession
from .settings import SessionSettings
from .slurm import SlurmJob
from .tunnels import KernelPorts


class KernelSeat:
    def __init__(self, kernel_id: str) -> None:
        self.kernel_id = kernel_id
        self.ports: KernelPorts | None = None  # bound at the first start, kept to release
        self.session: KernelSession | None = None  # the session, while there is one
        self.placement: Placement | None = None  # where the last session ran
        self.job: SlurmJob | None = None  # a Slurm kernel's job, kept across restarts
        self.handshake: Handshake | None = None  # an adopted kernel's, until it restarts
        self.reaped = False  # the session's exit status has been collected
        self._slot: HostEntry | None = None  # the host slot to give back

    @property
    def has_process(self) -> bool:
        return self.session is not None and not self.reaped

    def rename(self, kernel_id: str) -> None:
        """A pre-spawned kernel's seat becomes the kernel id of the start that took it."""
        self.kernel_id = kernel_id
        if self.session is not None:
            self.session.rename(kernel_id)

    def last_handshake(self) -> Handshake | None:
        return self.session.handshake if self.session is not None else self.handshake

    async def start(
        self,
        request: PlacementRequest,
        tries: Tries,
        settings: Callable[[HostEntry], SessionSettings],
        spec: Callable[[Placement], dict[str, Any]],
    ) -> KernelSession:
        """A new session, on the host placement picks (the next one if a host
        cannot be reached); the ports are bound first if this is the first start."""
        fresh = self.ports is None
        ports = self.ports = self.ports or await KernelPorts.open()

        async def start_session(placement: Placement) -> KernelSession:
            entry = placement.entry
            session = KernelSession(settings(entry), get_engine().pool, ports, self.job)
            try:
                await session.start(spec(placement))
            finally:
                self.job = session.job  # submitted even if the start failed after
            return session

        try:
            session, placement = await start_with_failover(
                get_engine().placement, request, tries, start_session
            )
        except BaseException:
            if fresh:
                self.ports = None
                await asyncio.shield(ports.aclose())
            raise
        self.session, self.placement, self.reaped = session, placement, False
        self._slot, self.handshake = placement.entry, None
        return session

    async def adopt(
        self,
        entry: HostEntry,
        settings: SessionSettings,
        handshake: Handshake,
        token: str,
        saved_ports: dict[str, int] | None,
    ) -> KernelSession:
        """Reattach to an session another process started (its saved info)."""
        ports = await KernelPorts.open(saved_ports)
        try:
            session = KernelSession(settings, get_engine().pool, ports, self.job)
            await session.adopt(handshake, token)
        except BaseException:
            await asyncio.shield(ports.aclose())
            raise
        get_engine().placement.adopt(entry)
        self.ports, self.session, self.reaped = ports, session, False
        self.placement, self._slot, self.handshake = Placement(entry), entry, handshake
        return session

    async def release(
        self,
        restart: bool,
        connect_options: Callable[[HostEntry], dict[str, Any]],
        idle_timeout: float,
    ) -> None:
        """The session is over: close it and give its slot back.  Unless a restart
        follows, the ports close and the Slurm job is cancelled too.  Idempotent."""
        session, self.session = self.session, None
        self.reaped = True
        slot, self._slot = self._slot, None
        ports, job = (None, None) if restart else (self.ports, self.job)
        if not restart:
            self.ports = self.job = None
        entry = self.placement.entry if self.placement else None
        try:
            if session is not None:
                await session.aclose()
        finally:
            if job is not None and entry is not None:
                options = connect_options(entry)
                await cancel_job(
                    get_engine().pool, entry.host, options, job, idle_timeout=idle_timeout
                )
            if slot is not None:
                get_engine().placement.release(slot)
            if ports is not None:
                await ports.aclose()
