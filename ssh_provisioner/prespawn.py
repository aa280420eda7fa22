"""Instant kernels: kernels started ahead of time, each handed to one start that fits.

A kernelspec with ``prespawn: N`` (or a host entry with ``prespawn``) keeps N kernels
started and idle, in a process that keeps kernels for others (Jupyter Server, through
the server extension, or one that calls :func:`enable`).  A start that fits takes one:
its manager gets that kernel's ports and keys, and a new one is spawned in the
background.  A kernel is handed out once; one nobody took within ``prespawn_max_idle``
seconds is ended and replaced.

What "fits": a pre-spawned kernel is started as the kernelspec's plain start would be
(its argv, the server's environment, its default choices, its working directory), so
a start takes one only if what crosses to the host is the same: the argv, the
``KERNEL_*`` and ``forward_env`` variables, the choices, the signing scheme and
transport encryption, and the working directory on the host (a notebook folder that
path_map maps is a different one).  ``JPY_SESSION_NAME`` differs per notebook: it is
told to a Python kernel when it is taken (see ``tell_session_name``).

The reserve lives on the engine's loop, and ends its kernels when the engine closes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import zmq
import zmq.asyncio
from jupyter_client.session import Session

from .errors import HostSelectionError
from .status import board

if TYPE_CHECKING:
    from .seat import KernelSeat

log = logging.getLogger(__name__)

RETRY_AFTER_FAILURE = 30.0  # seconds before a shelf whose spawn failed tries again
SESSION_NAME = "JPY_SESSION_NAME"
_enabled = False


def enable() -> None:
    """Keep pre-spawned kernels in this process (the server extension calls this): a
    kernelspec's ``prespawn`` is ignored elsewhere, where a reserve would only start
    kernels nobody takes (a papermill run, a script)."""
    global _enabled
    _enabled = True


def enabled() -> bool:
    return _enabled


@dataclass(frozen=True)
class Fit:
    """What crosses to the host and must be the same for a start to take a kernel."""

    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]  # without JPY_SESSION_NAME
    choices: tuple[tuple[str, Any], ...]  # without the host (the reserve's own choice)
    scheme: str
    kernel_name: str
    curve: bool

    @classmethod
    def of(cls, argv: list[str], env: dict[str, str], choices: dict[str, Any], **rest: Any) -> Fit:
        return cls(
            tuple(argv),
            tuple(sorted((k, v) for k, v in env.items() if k != SESSION_NAME)),
            tuple(sorted((k, repr(v)) for k, v in choices.items() if k != "host")),
            **rest,
        )


@dataclass(eq=False)
class Ready:
    """A pre-spawned kernel waiting for its start."""

    seat: KernelSeat
    connection: dict[str, Any]  # its key, signing scheme and CurveZMQ pair
    host: str  # the host entry's name
    host_cwd: str | None  # the folder it was asked to start in on the host (None: default)
    pin: str | None  # the host entry whose own ``prespawn`` it counts in
    born: float = field(default_factory=time.monotonic)
    expiry: asyncio.TimerHandle | None = None

    def alive(self) -> bool:
        session = self.seat.session
        return session is not None and session.poll() is None


# spawn(pin) -> a started kernel on the pinned host entry (None: where policy says)
Spawner = Callable[[str | None], Coroutine[Any, Any, Ready]]
# release(ready) -> its kernel ended, its ports closed, its host slot given back
Releaser = Callable[[Ready], Coroutine[Any, Any, None]]


class Shelf:
    """One kernelspec's pre-spawned kernels, refilled to its targets."""

    def __init__(
        self,
        name: str,
        fit: Fit,
        targets: dict[str | None, int],
        max_idle: float,
        spawn: Spawner,
        release: Releaser,
    ) -> None:
        self.name, self.fit, self.targets, self.max_idle = name, fit, targets, max_idle
        self._spawn, self._release = spawn, release
        self.ready: list[Ready] = []
        self._spawning: Counter[str | None] = Counter()
        self._tasks: set[asyncio.Task[None]] = set()
        self._resting_until = 0.0  # after a failed spawn, no new one until then
        self._closed = False

    def fill(self) -> None:
        """Spawn what is missing from each target, in the background."""
        if self._closed or time.monotonic() < self._resting_until:
            return
        have = Counter(ready.pin for ready in self.ready) + self._spawning
        for pin, target in self.targets.items():
            for _ in range(target - have[pin]):
                self._spawning[pin] += 1
                self._background(self._spawn_one(pin))

    def take(self, fits: Callable[[Ready], bool]) -> Ready | None:
        """The oldest live kernel that ``fits``, off the shelf, or None."""
        for ready in list(self.ready):
            if not ready.alive():
                self._drop(ready, "it ended while waiting")
            elif fits(ready):
                self.ready.remove(ready)
                if ready.expiry is not None:
                    ready.expiry.cancel()
                self.fill()
                return ready
        return None

    async def aclose(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        ready, self.ready = self.ready, []
        await asyncio.gather(*(self._end(r) for r in ready), return_exceptions=True)

    async def _spawn_one(self, pin: str | None) -> None:
        try:
            ready = await self._spawn(pin)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._resting_until = time.monotonic() + RETRY_AFTER_FAILURE
            # every host full (max_kernels) is the normal end of a busy day: no alarm
            level = logging.INFO if isinstance(exc, HostSelectionError) else logging.WARNING
            log.log(
                level,
                "kernelspec %s: a kernel to keep ready did not start (next try in %gs): %s",
                self.name, RETRY_AFTER_FAILURE, exc,
            )  # fmt: skip
            loop = asyncio.get_running_loop()
            loop.call_later(RETRY_AFTER_FAILURE, self.fill)
            return
        finally:
            self._spawning[pin] -= 1
        if self._closed:
            await self._end(ready)
            return
        self.ready.append(ready)
        ready.expiry = asyncio.get_running_loop().call_later(self.max_idle, self._expire, ready)
        log.info("kernelspec %s: %s ready on %s", self.name, ready.seat.kernel_id, ready.host)

    def _expire(self, ready: Ready) -> None:
        if ready in self.ready:
            self._drop(ready, f"nobody took it in {self.max_idle:g}s")

    def _drop(self, ready: Ready, why: str) -> None:
        log.info("kernelspec %s: kernel %s replaced: %s", self.name, ready.seat.kernel_id, why)
        self.ready.remove(ready)
        self._background(self._end(ready))
        self.fill()

    async def _end(self, ready: Ready) -> None:
        try:
            await self._release(ready)
        finally:
            board.forget(ready.seat.kernel_id)

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class Reserve:
    """The process's shelves, one per kernelspec (the engine's)."""

    def __init__(self) -> None:
        self.shelves: dict[str, Shelf] = {}

    def shelf(self, key: str, make: Callable[[], Shelf]) -> Shelf:
        shelf = self.shelves.get(key)
        if shelf is None:
            shelf = self.shelves[key] = make()
        shelf.fill()
        return shelf

    def ready(self) -> list[Ready]:
        return [ready for shelf in self.shelves.values() for ready in shelf.ready]

    async def aclose(self) -> None:
        shelves, self.shelves = list(self.shelves.values()), {}
        await asyncio.gather(*(s.aclose() for s in shelves), return_exceptions=True)


async def tell_session_name(info: dict[str, Any], name: str, timeout: float) -> None:
    """Give a taken Python kernel the notebook's JPY_SESSION_NAME, as ipykernel would
    have read it at its start (``os.environ`` and ``__session__``).

    One silent execute on the control channel, sent before the manager returns the
    kernel's connection info, so it is there before the client's first request; the
    shell channel's spare stays for that client.  Its reply is awaited in the
    background: closing the socket before the relay delivered it can lose it."""
    session = Session(key=info["key"], signature_scheme=info["signature_scheme"])
    code = (
        "import os as _sshp_os\n"
        f"_sshp_os.environ[{SESSION_NAME!r}] = {name!r}\n"
        f"get_ipython().user_ns['__session__'] = {name!r}\n"
        "del _sshp_os\n"
    )
    socket: zmq.asyncio.Socket = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    if info.get("curve_publickey"):
        public, secret = zmq.curve_keypair()
        socket.curve_serverkey = _bytes(info["curve_publickey"])
        socket.curve_publickey, socket.curve_secretkey = public, secret
    socket.connect(f"tcp://{info['ip']}:{info['control_port']}")
    content = {"code": code, "silent": True, "store_history": False}
    session.send(socket, session.msg("execute_request", content))

    async def confirmed() -> None:
        try:
            await asyncio.wait_for(socket.recv_multipart(), timeout)
        except TimeoutError:
            log.warning("a taken kernel did not confirm its %s in %gs", SESSION_NAME, timeout)
        finally:
            socket.close(linger=0)

    _confirmations.add(task := asyncio.get_running_loop().create_task(confirmed()))
    task.add_done_callback(_confirmations.discard)


_confirmations: set[asyncio.Task[None]] = set()


def _bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode()
