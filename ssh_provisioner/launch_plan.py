"""A kernel's launch, planned and then placed: what crosses from this machine to the host.

``plan_launch`` takes what a start request says (the kernelspec's argv, the env that
may cross, its small resource files, the notebook's folder) once per start;
``launch_spec`` adds what the chosen host's entry and the options say, for each host
tried (path_map turns the notebook's folder into the host's).
"""

from __future__ import annotations

import asyncio
import base64
import fnmatch
import os
import secrets
from dataclasses import dataclass
from typing import Any

from jupyter_client.kernelspec import KernelSpec

from .hosts import HostEntry
from .options import ProvisionerOptions
from .paths import PathMap
from .policies import Placement

# Forwarded from the launch request whatever forward_env says: what a kernel needs from
# its client.  Everything else in the request env is the *server's* environment.
ALWAYS_FORWARDED = ("JPY_SESSION_NAME", "KERNEL_*")
MAX_RESOURCE_BYTES = 1 << 20


@dataclass(frozen=True)
class LaunchPlan:
    """What pre_launch took from the start request; launch_kernel carries it out."""

    argv: list[str]
    env: dict[str, str]
    resource_files: dict[str, str]
    pinned_host: str | None = None
    labels: frozenset[str] = frozenset()
    local_cwd: str | None = None  # the notebook's folder on this machine (Jupyter Server's)


async def plan_launch(
    kernel_spec: KernelSpec,
    request_env: dict[str, str],
    argv: list[str],
    forward_env: list[str],
    local_cwd: str | None = None,
) -> LaunchPlan:
    """The plan for one start: the env that crosses over (``forward_env`` and what a
    kernel needs from its client) and the kernelspec's small resource files."""
    patterns = (*ALWAYS_FORWARDED, *forward_env)
    forwarded = {
        name: value
        for name, value in request_env.items()
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
    }
    resource_files = await asyncio.to_thread(read_resource_files, kernel_spec.resource_dir)
    labels = request_env.get("KERNEL_SSH_LABELS", "")
    return LaunchPlan(
        argv,
        forwarded,
        resource_files,
        pinned_host=request_env.get("KERNEL_SSH_HOST") or None,
        labels=frozenset(label.strip() for label in labels.split(",") if label.strip()),
        local_cwd=local_cwd,
    )


def launch_spec(
    options: ProvisionerOptions,
    kernel: tuple[str, KernelSpec],
    plan: LaunchPlan,
    placement: Placement,
    connection: dict[str, Any],
) -> dict[str, Any]:
    """The spec the host's launcher gets (host/spec.py checks it): the plan, placed."""
    kernel_id, kernel_spec = kernel
    argv = plan.argv
    entry = placement.entry
    python = entry.override("remote_python", options.remote_python)
    if argv and argv[0] in ("python", "python3"):
        argv = [python, *argv[1:]]
    remote_env = {**options.remote_env, **entry.override("remote_env", {})}
    return {
        "argv": argv,
        "env": {**plan.env, **placement.env},
        "env_templates": [*kernel_spec.env.items(), *remote_env.items()],
        "resource_files": plan.resource_files,
        "cwd": entry.override("remote_cwd", options.remote_cwd) or None,
        "transport": entry.override("remote_transport", options.remote_transport),
        "kernel_id": kernel_id,
        "orphan_timeout": options.orphan_timeout,
        "liveness_timeout": options.liveness_for(entry)[1],
        "attach_token": secrets.token_hex(16),
        "outage_buffer": options.outage_buffer,
        # Streams nobody resumes (the provisioner gave up, or went) end after this.
        "stream_linger": options.reconnect_timeout + options.connect_timeout,
        "ready_timeout": options.launch_timeout,
        "connection": connection,
        "watch_ports": options.forward_ports != "off",
        "mapped_cwd": mapped_cwd(options, entry, plan),
        "remote_kernel": entry.override("remote_kernel", options.remote_kernel) or None,
        "kernel_search": list(options.discover_paths),
    }


def path_map_for(options: ProvisionerOptions, entry: HostEntry) -> PathMap:
    """The host entry's path_map, else the kernelspec's."""
    return PathMap.parse(entry.override("path_map", options.path_map))


def mapped_cwd(options: ProvisionerOptions, entry: HostEntry, plan: LaunchPlan) -> str | None:
    """Where the notebook's folder is on the host, if path_map maps it."""
    return path_map_for(options, entry).to_remote(plan.local_cwd) if plan.local_cwd else None


def read_resource_files(resource_dir: str | None) -> dict[str, str]:
    """The kernelspec's own small files, recreated on the host for {resource_dir}."""
    if not resource_dir or not os.path.isdir(resource_dir):
        return {}
    files: dict[str, str] = {}
    total = 0
    for entry in sorted(os.scandir(resource_dir), key=lambda e: e.name):
        if not entry.is_file():
            continue
        total += entry.stat().st_size
        if total > MAX_RESOURCE_BYTES:
            return {}
        with open(entry.path, "rb") as f:
            files[entry.name] = base64.b64encode(f.read()).decode()
    return files
