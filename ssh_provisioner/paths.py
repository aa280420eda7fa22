"""Folders that are the same on both sides, under different paths (``path_map``).

The same files mounted at one path on the machine that runs Jupyter and at another on
the host (NFS, sshfs, a sync tool): a notebook in ``/home/me/projects/foo`` gets a
kernel in ``/scratch/me/projects/foo``, and a path the kernel reports there resolves to
the server's side.  The provisioner maps paths; it never copies files.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any

from .errors import ProvisionerConfigError


@dataclass(frozen=True)
class PathMap:
    """(local, remote) folder pairs, the longest match first."""

    pairs: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, value: Any) -> PathMap:
        """A ProvisionerConfigError names a pair that is not two absolute paths."""
        if not isinstance(value, list):
            raise ProvisionerConfigError(
                f"path_map: {value!r} is not a list of "
                '{"local": "/path/here", "remote": "/path/on/the/host"} pairs'
            )
        pairs = []
        for item in value:
            ok = isinstance(item, dict) and set(item) == {"local", "remote"}
            paths = [item.get(side) for side in ("local", "remote")] if ok else []
            if not ok or not all(isinstance(p, str) and p.startswith("/") for p in paths):
                raise ProvisionerConfigError(
                    f"path_map: {item!r} is not a pair of absolute paths "
                    '{"local": "/path/here", "remote": "/path/on/the/host"}'
                )
            pairs.append((posixpath.normpath(paths[0]), posixpath.normpath(paths[1])))
        pairs.sort(key=lambda pair: -len(pair[0]))
        return cls(tuple(pairs))

    def to_remote(self, local: str) -> str | None:
        """The host's path for a path on this machine, or None if no folder maps it."""
        return _translate(local, [(here, there) for here, there in self.pairs])

    def to_local(self, remote: str) -> str | None:
        """This machine's path for a path on the host, or None if no folder maps it."""
        by_remote = sorted(((there, here) for here, there in self.pairs), key=lambda p: -len(p[0]))
        return _translate(remote, by_remote)


def _translate(path: str, pairs: list[tuple[str, str]]) -> str | None:
    path = posixpath.normpath(path)
    for source, target in pairs:
        if path == source or path.startswith(source.rstrip("/") + "/"):
            rest = path[len(source) :].lstrip("/")
            return posixpath.join(target, rest) if rest else target
    return None
