"""The status board: what each remote kernel of this process is doing, for whoever
shows it (JupyterLab's status bar and panel, through the server extension) or counts
it (the Prometheus metrics).

The objects that own a fact post it here, under the kernel's id: the provisioner its
kernelspec, choices and start; a session its host, link and forwards; a Slurm job its
queue state, node and walltime.  They post from the engine's thread; readers take
snapshots from theirs.  Each change bumps the board's version and wakes the readers
waiting for it (one long poll for all kernels, not one request per kernel).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

# A kernel's phase, as the user sees it (prespawned: started ahead, waiting for a start).
STARTING, QUEUED, RUNNING, LINK_DOWN, ENDED, FAILED, PRESPAWNED = (
    "starting",
    "queued",
    "running",
    "link-down",
    "ended",
    "failed",
    "prespawned",
)
MERGED = frozenset({"slurm", "link"})
KEEP_ENDED = 300.0  # seconds a failed or ended kernel stays on the board (for the UI)

Listener = Callable[[str, dict[str, Any], dict[str, Any]], None]


class StatusBoard:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kernels: dict[str, dict[str, Any]] = {}
        self._version = 0
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._listeners: list[Listener] = []

    @property
    def version(self) -> int:
        return self._version

    def listen(self, listener: Listener) -> None:
        """``listener(kernel_id, before, after)`` after each change (metrics)."""
        self._listeners.append(listener)

    def post(self, kernel_id: str, **facts: Any) -> None:
        """Set ``facts`` in the kernel's entry; ``slurm`` and ``link``, posted a part
        at a time by their owners, merge into what is there."""
        with self._lock:
            before = self._kernels.get(kernel_id) or {"kernel_id": kernel_id}
            after = copy.deepcopy(before)
            for name, value in facts.items():
                if name in MERGED and isinstance(after.get(name), dict):
                    after[name].update(value)
                else:
                    after[name] = value
            if after == before:
                return  # nothing new: no reader wakes
            after["updated"] = time.time()
            self._kernels[kernel_id] = after
            self._prune(after["updated"])
            self._version += 1
            waiters, self._waiters = self._waiters, []
        for listener in self._listeners:
            listener(kernel_id, before, after)
        _wake(waiters)

    def drop(self, kernel_id: str) -> None:
        """The kernel is gone for good (its final cleanup); a failed start keeps its
        error on the board a while, for the page that asked."""
        entry = self.get(kernel_id)
        if entry is not None:
            phase = FAILED if entry.get("phase") == FAILED else ENDED
            self.post(kernel_id, phase=phase, gone=True)

    def rename(self, old: str, new: str, **facts: Any) -> None:
        """A pre-spawned kernel was taken: its entry goes on under the taker's id, under
        what the start posted of itself and ``facts``."""
        with self._lock:
            entry = self._kernels.pop(old, None) or {}  # where it runs, its link, its ports
            self._kernels[new] = {**entry, **self._kernels.get(new, {}), "kernel_id": new}
        self.post(new, **facts)

    def forget(self, kernel_id: str) -> None:
        """A pre-spawned kernel nobody took is gone: no user's kernel, no trace."""
        with self._lock:
            if self._kernels.pop(kernel_id, None) is None:
                return
            self._version += 1
            waiters, self._waiters = self._waiters, []
        _wake(waiters)

    def _prune(self, now: float) -> None:
        for kernel_id, entry in list(self._kernels.items()):
            if entry.get("phase") in (ENDED, FAILED) and now - entry["updated"] > KEEP_ENDED:
                del self._kernels[kernel_id]

    def snapshot(self, kernel_ids: Iterable[str] | None = None) -> tuple[int, list[dict[str, Any]]]:
        with self._lock:
            wanted = self._kernels if kernel_ids is None else set(kernel_ids)
            entries = [copy.deepcopy(e) for k, e in self._kernels.items() if k in wanted]
            return self._version, entries

    def get(self, kernel_id: str) -> dict[str, Any] | None:
        with self._lock:
            entry = self._kernels.get(kernel_id)
            return copy.deepcopy(entry) if entry is not None else None

    async def changed(self, since: int, timeout: float) -> int:
        """The version once it is past ``since``, or after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._version != since:
                return self._version
            future: asyncio.Future[None] = loop.create_future()
            self._waiters.append((loop, future))
        try:
            await asyncio.wait_for(future, timeout)
        except TimeoutError:
            with self._lock:
                if (loop, future) in self._waiters:
                    self._waiters.remove((loop, future))
        return self._version


def _wake(waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]) -> None:
    for loop, future in waiters:
        with contextlib.suppress(RuntimeError):  # its loop has closed: nobody waits
            loop.call_soon_threadsafe(_settle, future)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Traffic:
    """Bytes relayed between clients and kernels, and IOPub bytes dropped, per host.
    Counted on the engine's thread (a dict add per chunk: no lock but for a new key),
    read by a scrape on another."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bytes: dict[tuple[str, str], int] = {}

    def add(self, host: str, kind: str, count: int) -> None:
        key = (host, kind)
        if key in self._bytes:
            self._bytes[key] += count  # an existing key: the dict does not change size
        else:
            with self._lock:
                self._bytes[key] = self._bytes.get(key, 0) + count

    def snapshot(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._bytes)


board = StatusBoard()
traffic = Traffic()
