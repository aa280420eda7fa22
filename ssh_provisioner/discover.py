"""What a host can run, found for you: ``ssh-provisioner discover HOST`` and ``install
--from-host HOST``.

The host runs the ``discover`` payload (host/kernels.py), which reads its kernelspecs
and its environments with ipykernel from the filesystem and answers in one line.  A
kernelspec found there is installed here as ``remote_kernel: NAME``, read on the host
at each start (so a change there needs no reinstall); an environment without one, as
its Python running ipykernel.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from .connect import connect
from .control import start_launcher
from .errors import LaunchError, ProvisionerConfigError
from .handshake import LineReader
from .hosts import Host
from .kernelspec import build_kernelspec
from .link import SSHLink

COMMAND_NOT_FOUND = 127


async def discover_on(
    host: Host, options: dict[str, Any], python: str, search: list[str], timeout: float
) -> list[dict[str, Any]]:
    """The kernels ``host`` can run (host/kernels.discover's entries)."""
    link = await connect(host, options, connect_timeout=timeout)
    try:
        return await discover_over(link, host, python, search, timeout)
    finally:
        link.close()


async def discover_over(
    link: SSHLink, host: Host, python: str, search: list[str], timeout: float
) -> list[dict[str, Any]]:
    """The same, over an open link."""
    try:
        process = await start_launcher(link, python, entry="discover")
        process.stdin.write(json.dumps({"search": search}).encode() + b"\n")
        reader = LineReader(process.stdout, after_login=str(host))
        while (line := await asyncio.wait_for(reader.readline(), timeout)) is not None:
            event = json.loads(line)
            if isinstance(event, dict) and event.get("event") == "discovered":
                return [dict(entry) for entry in event["kernels"]]
        await asyncio.wait_for(process.wait_closed(), timeout)
        stderr = (await process.stderr.read(4096)).decode("utf-8", "replace").strip()
    except (TimeoutError, ValueError) as exc:
        raise LaunchError(f"cannot discover kernels on {host}: {exc}", host=str(host)) from exc
    if process.exit_status == COMMAND_NOT_FOUND:
        why = f"remote_python {python!r} is not there (exit status 127)"
    else:
        why = f"exit status {process.exit_status}: {stderr or '(no output)'}"
    raise LaunchError(f"cannot discover kernels on {host}: {why}", host=str(host))


def render(host: str, kernels: list[dict[str, Any]]) -> str:
    if not kernels:
        return f"{host}: no kernelspec and no environment with ipykernel found"
    rows = [("NAME", "KIND", "LANGUAGE", "DISPLAY NAME", "WHERE")]
    rows += [
        (k["name"], k["kind"], k.get("language") or "?", k.get("display_name") or "", k["path"])
        for k in kernels
    ]
    widths = [max(len(str(row[i])) for row in rows) for i in range(4)]
    return "\n".join(
        "  ".join(str(cell).ljust(width) for cell, width in zip(row[:4], widths, strict=True))
        + "  "
        + str(row[4])
        for row in rows
    )


def kernelspec_name(entry: dict[str, Any], host: str) -> str:
    """A local name for a host's kernel: its name, then the host's."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{entry['name']}-{host}").strip("-").lower()


def kernelspec_for(entry: dict[str, Any], host: str, config: dict[str, Any]) -> dict[str, Any]:
    """kernel.json for a host's kernel: a kernelspec there by name (``remote_kernel``,
    read on the host at each start), an environment by its Python."""
    display = f"{entry.get('display_name') or entry['name']} ({host})"
    language = str(entry.get("language") or "python")
    if entry["kind"] == "kernelspec":
        config = {**config, "remote_kernel": entry["name"]}
    return build_kernelspec(
        hosts=[host],
        display_name=display,
        language=language,
        argv=[str(a) for a in entry["argv"]],  # the host's, as it was (remote_kernel rules)
        config=config,
    )


def choose(kernels: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    """The entries named (all when none is); an unknown name is an error saying what
    the host has."""
    if not names:
        return kernels
    by_name = {k["name"]: k for k in kernels}
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise ProvisionerConfigError(
            f"no kernel {', '.join(map(repr, unknown))} on the host; it has: "
            + (", ".join(sorted(by_name)) or "nothing")
        )
    return [by_name[name] for name in names]
