"""The SSH engine: one event loop per process, in a daemon thread, that owns every SSH
connection, forward, launcher channel, ping and pool timer.

Why a loop of our own: a kernel's forwards must relay bytes, its launcher must be pinged
and idle connections must close whether or not the *caller's* loop runs.  The
synchronous ``KernelManager`` runs each provisioner coroutine on a loop that stops
between calls, ``asyncio.run()`` closes its loop when the script ends, and Jupyter
Server's loop has better things to do than relay every SSH byte.  So the provisioner's
hooks hand their work to the engine (:meth:`Engine.run`) and await the answer on
whatever loop called them.

The engine starts on first use and closes at interpreter exit: connections close, so
launchers see EOF (a launcher whose kernel still runs then starts its orphan countdown,
and a spare launcher exits).  :func:`shutdown_engine` closes it earlier; the next use
starts a new one.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import logging
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from .placement import PlacementState
from .pool import ConnectionPool
from .prespawn import Reserve
from .tunnels import close_open_ports

log = logging.getLogger(__name__)

T = TypeVar("T")
CLOSE_TIMEOUT = 10.0


class Engine:
    """An event loop in a daemon thread, with the process's connection pool and
    placement state.  Everything that touches asyncssh runs here."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.pool = ConnectionPool()
        self.placement = PlacementState()
        self.reserve = Reserve()  # pre-spawned kernels (prespawn.py)
        self._closed = False
        self._thread = threading.Thread(
            target=self._run, name="ssh-provisioner-engine", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            with contextlib.suppress(RuntimeError):
                self.loop.run_until_complete(self.loop.shutdown_default_executor())
            self.loop.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def in_engine(self) -> bool:
        """True when called from the engine's own thread."""
        return threading.current_thread() is self._thread

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the engine from any thread."""
        if self._closed:
            coro.close()
            raise RuntimeError("the ssh-provisioner engine is shut down")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the engine and await its result on the calling loop.

        Cancelling the caller cancels the work on the engine too.
        """
        if self.in_engine():
            return await coro
        return await asyncio.wrap_future(self.submit(coro))

    def run_blocking(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the engine and block this (non-engine) thread for the result."""
        if self.in_engine():
            coro.close()
            raise RuntimeError("run_blocking called on the engine's own thread")
        return self.submit(coro).result(timeout)

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Close every connection (launchers see EOF), cancel what still runs, stop the
        loop and join the thread.  Idempotent; bounded by ``timeout`` seconds."""
        if self._closed:
            return
        if self.in_engine():
            raise RuntimeError("the engine cannot close itself from its own thread")
        try:
            self.submit(self._aclose()).result(timeout)
        except (concurrent.futures.TimeoutError, RuntimeError) as exc:
            log.warning("ssh-provisioner engine did not close cleanly: %r", exc)
        finally:
            self._closed = True
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)

    async def _aclose(self) -> None:
        await self.reserve.aclose()  # ends the kernels nobody took, on their connections
        await self.pool.aclose()
        await close_open_ports()  # a kernel still running keeps its ports no longer
        current = asyncio.current_task()
        others = [task for task in asyncio.all_tasks() if task is not current]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)


_engine: Engine | None = None
_engine_lock = threading.Lock()


def get_engine() -> Engine:
    """The process's engine, started on first use (and again after a shutdown)."""
    global _engine
    engine = _engine
    if engine is not None and not engine.closed:
        return engine
    with _engine_lock:
        if _engine is None or _engine.closed:
            _engine = Engine()
        return _engine


def shutdown_engine(timeout: float = CLOSE_TIMEOUT) -> None:
    """Close the process's SSH engine now: every pooled connection closes, and launchers
    see EOF.  Kernels still running start their orphan countdown on the host (they can be
    reattached within ``orphan_timeout``).  Called at interpreter exit; call it earlier
    to release everything at a point of your choosing.  A later kernel start starts a
    new engine."""
    global _engine
    with _engine_lock:
        engine, _engine = _engine, None
    if engine is not None:
        engine.close(timeout)


def _forget_after_fork() -> None:
    # A forked child has the parent's engine object but not its thread.
    global _engine, _engine_lock
    _engine = None
    _engine_lock = threading.Lock()


atexit.register(shutdown_engine)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)
