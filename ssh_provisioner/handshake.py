"""What a launcher says: its handshake, and lines read within bounds.

A launcher's stdout may begin with whatever the login shell printed (a banner, module
or conda chatter); its own output starts after LAUNCHER_BEGINS.  A hostile or broken
peer cannot make us buffer without limit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from .errors import SSHProvisionerError
from .host.wire import CHANNELS
from .link import ByteReader
from .payload import LAUNCHER_BEGINS

log = logging.getLogger(__name__)

MAX_LINE = 1 << 20  # a handshake or event line longer than this is hostile or broken
PREAMBLE_MAX = 4 << 20  # what a login shell may print before the launcher (skipped)
PREAMBLE_SAMPLE = 4096  # of it, kept for the log and errors
LOOPBACK = "127.0.0.1"


class KernelGone(SSHProvisionerError):
    """Reattaching found no launcher: the kernel has ended."""


@dataclass(frozen=True)
class Handshake:
    """What the launcher reports once the kernel listens on all five endpoints."""

    pid: int
    pgid: int
    launcher_pid: int
    endpoints: dict[str, int | str]
    runtime_dir: str
    connection_file: str
    cwd: str
    home: str
    hostname: str
    control: str = ""  # the launcher's reattach socket
    relay: int | str = ""  # the launcher's relay: a port on the host's loopback, or a path
    relay_host: str = LOOPBACK  # where the relay's port listens (a Slurm node's address)
    cwd_note: str = ""  # why the kernel is not in the folder path_map gave it
    answers_zmtp: bool = False  # the relay takes the kernel's ZMTP handshake off (host/zmtp)

    @classmethod
    def from_event(cls, event: dict[str, Any]) -> Handshake:
        endpoints = event["endpoints"]
        if not isinstance(endpoints, dict) or set(endpoints) != set(CHANNELS):
            raise ValueError("endpoints must name the five kernel channels")
        return cls(
            pid=int(event["pid"]),
            pgid=int(event["pgid"]),
            launcher_pid=int(event["launcher_pid"]),
            endpoints={k: v if isinstance(v, str) else int(v) for k, v in endpoints.items()},
            runtime_dir=str(event["runtime_dir"]),
            connection_file=str(event["connection_file"]),
            cwd=str(event["cwd"]),
            home=str(event["home"]),
            hostname=str(event["hostname"]),
            control=str(event.get("control") or ""),
            relay=relay if isinstance(relay := event.get("relay") or "", str) else int(relay),
            relay_host=str(event.get("relay_host") or LOOPBACK),
            cwd_note=str(event.get("cwd_note") or ""),
            answers_zmtp=bool(event.get("answers_zmtp")),
        )


class LineReader:
    """Bounded line reader: a hostile peer cannot make us buffer without limit.

    ``after_login`` (a launcher's stdout): what a login shell printed before the
    launcher's first line (LAUNCHER_BEGINS) is skipped, up to PREAMBLE_MAX bytes, and
    kept in ``preamble`` (its start) for the log and for errors."""

    def __init__(self, stream: ByteReader, *, after_login: str = "") -> None:
        self._stream = stream
        self._buffer = bytearray()
        self._label = after_login  # the host, for the log line
        self._marker = b"\n" + LAUNCHER_BEGINS.encode() + b"\n" if after_login else b""
        self.preamble = b""

    async def _skip_login_output(self) -> None:
        marker, skipped = self._marker, 0
        while True:
            found = self._buffer.find(marker)
            cut = found if found >= 0 else max(0, len(self._buffer) - len(marker) + 1)
            if len(self.preamble) < PREAMBLE_SAMPLE:
                self.preamble += bytes(self._buffer[: min(cut, PREAMBLE_SAMPLE)])
            skipped += cut
            del self._buffer[:cut]
            if found >= 0:
                del self._buffer[: len(marker)]
                self._marker = b""
                if skipped:
                    log.debug(
                        "%s: skipped %d byte(s) the login shell printed before the launcher: "
                        "%r", self._label, skipped, self.preamble[:200],
                    )  # fmt: skip
                return
            if skipped > PREAMBLE_MAX:
                raise ValueError(
                    f"more than {PREAMBLE_MAX} bytes of output before the launcher's "
                    f"(the login shell prints {self.preamble[:80]!r}...)"
                )
            chunk = await self._stream.read(65536)
            if not chunk:  # no launcher spoke: all of it was someone else's
                self._marker = b""
                self.preamble = (self.preamble + bytes(self._buffer))[:PREAMBLE_SAMPLE]
                self._buffer.clear()
                return
            self._buffer += chunk

    async def readline(self) -> bytes | None:
        if self._marker:
            await self._skip_login_output()
        while True:
            newline = self._buffer.find(b"\n")
            if newline >= 0:
                line = bytes(self._buffer[: newline + 1])
                del self._buffer[: newline + 1]
                return line
            if len(self._buffer) > MAX_LINE:
                self._buffer.clear()  # the reader may go on with what follows
                raise ValueError(f"a line longer than {MAX_LINE} bytes")
            chunk = await self._stream.read(65536)
            if not chunk:
                return None
            self._buffer += chunk
