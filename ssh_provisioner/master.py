"""Finding the user's own OpenSSH master for a host (``use_control_master``).

OpenSSH decides where a host's master listens: ``ssh -G HOST`` prints the resolved
``ControlPath`` (its tokens expanded, from the same config files ``ssh`` reads).  A
master runs there if it answers the mux hello and an alive check.

- ``auto`` (the default): use the master when one runs, else connect ourselves;
- ``always``: never authenticate; no master is an error saying how to open one;
- ``never``: always connect ourselves.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ControlMasterError, ProvisionerConfigError
from .hosts import Host
from .mux import MuxLink
from .mux_control import MasterNotOurs, master_answers
from .sshconfig import config_paths

log = logging.getLogger(__name__)

USE_CONTROL_MASTER = "use_control_master"  # a private connect option, like kbdint
MODES = ("auto", "always", "never")
SSH_G_TIMEOUT = 5.0


@dataclass(frozen=True)
class MasterPlace:
    """Where OpenSSH puts ``host``'s master, and how the user opens one."""

    control_path: str | None
    user: str
    open_command: str
    hostname: str  # as ssh resolves the destination (HostName, Port)
    port: int


def mode_of(options: dict[str, Any]) -> str:
    mode = str(options.get(USE_CONTROL_MASTER) or "auto").lower()
    if mode not in MODES:
        raise ProvisionerConfigError(
            f"use_control_master must be one of {', '.join(MODES)}, not {mode!r}"
        )
    return mode


def _config_args(options: dict[str, Any]) -> list[str]:
    """``ssh``'s -F for the config files asyncssh is told to read (ssh takes one)."""
    if options.get("config", ()) == ():
        return []  # both read ~/.ssh/config
    paths = config_paths(options)
    return ["-F", str(paths[0])] if paths else ["-F", "none"]


def _destination_args(host: Host, options: dict[str, Any]) -> list[str]:
    args: list[str] = []
    port = options.get("port", host.port)
    user = options.get("username", host.user)
    if port:
        args += ["-p", str(port)]
    if user:
        args += ["-l", str(user)]
    return [*args, host.hostname]


async def locate(host: Host, options: dict[str, Any]) -> MasterPlace:
    """Ask ``ssh -G`` where ``host``'s master lives; raises ControlMasterError if ssh
    cannot say (not installed, or the config does not parse)."""
    config = _config_args(options)
    destination = _destination_args(host, options)
    argv = ["ssh", "-G", *config, *destination]
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise ControlMasterError(
            f"SSH to {host}: cannot run OpenSSH's ssh to find the host's ControlPath: {exc}",
            host=str(host),
        ) from exc
    try:
        out, err = await asyncio.wait_for(process.communicate(), SSH_G_TIMEOUT)
    except BaseException:
        process.kill()
        await process.wait()
        raise
    if process.returncode != 0:
        raise ControlMasterError(
            f"SSH to {host}: {shlex.join(argv)} failed: {err.decode(errors='replace').strip()}",
            host=str(host),
        )
    values: dict[str, str] = {}
    for line in out.decode(errors="replace").splitlines():
        name, _, value = line.partition(" ")
        values.setdefault(name.lower(), value)
    path = values.get("controlpath", "none")
    if path.startswith("~"):  # ssh -G expands its tokens, not always the tilde
        path = str(Path.home()) + path[1:]
    return MasterPlace(
        control_path=None if path.lower() == "none" else path,
        user=values.get("user", ""),
        open_command=shlex.join(["ssh", *config, "-fN", *destination]),
        hostname=values.get("hostname", host.hostname),
        port=int(values.get("port", "22")),
    )


async def open_master(host: Host, options: dict[str, Any]) -> MuxLink | None:
    """The running master for ``host``, per ``use_control_master``; None to connect
    ourselves.  ``always`` with no master raises ControlMasterError saying what to run."""
    mode = mode_of(options)
    if mode == "never":
        return None
    try:
        place = await locate(host, options)
    except ControlMasterError:
        if mode == "always":
            raise
        log.debug("no OpenSSH master for %s: ssh -G failed", host, exc_info=True)
        return None
    if place.control_path is None:
        if mode == "always":
            raise ControlMasterError(
                f"SSH to {host}: use_control_master is 'always' but the ssh config gives "
                f"the host no ControlPath: add 'ControlMaster auto', 'ControlPath "
                f"~/.ssh/cm-%C' and 'ControlPersist 4h' to its Host entry, then open the "
                f"master with `{place.open_command}`",
                host=str(host),
            )
        return None
    try:
        link = await MuxLink.open(place.control_path, place.user)
    except MasterNotOurs as exc:
        log.warning("SSH to %s: %s", host, exc)
        if mode == "always":
            raise ControlMasterError(f"SSH to {host}: {exc}", host=str(host)) from exc
        return None
    except (OSError, TimeoutError) as exc:
        log.debug("no OpenSSH master for %s at %s: %s", host, place.control_path, exc)
        if mode == "always":
            raise ControlMasterError(
                f"SSH to {host}: no OpenSSH master is running at {place.control_path} "
                f"(use_control_master is 'always', so the provisioner does not log in "
                f"itself): open one with `{place.open_command}`",
                host=str(host),
            ) from exc
        return None
    if link.in_a_terminal:
        log.warning(
            "SSH to %s: the OpenSSH master at %s is an interactive ssh in a terminal: "
            "leaving its shell will wait until the kernels through it end (open masters "
            "in the background: `%s`, or ControlPersist)",
            host, place.control_path, place.open_command,
        )  # fmt: skip
    return link


async def master_running(host: Host, options: dict[str, Any]) -> bool:
    """Is a master serving ``host`` now (``use_control_master`` allowing it)?"""
    if mode_of(options) == "never":
        return False
    try:
        place = await locate(host, options)
    except ControlMasterError:
        return False
    return place.control_path is not None and await master_answers(place.control_path)


async def master_hint(host: Host, options: dict[str, Any]) -> str:
    """For an error on a host that has a ControlPath but no master: how to open one."""
    try:
        place = await locate(host, options)
    except ControlMasterError:
        return ""
    if place.control_path is None:
        return ""
    return f"; or open an OpenSSH master for it: `{place.open_command}`"
