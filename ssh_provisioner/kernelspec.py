"""Build, install and list kernelspecs that use ssh-provisioner (pure functions, plus the
one place that writes to Jupyter's kernelspec directories)."""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

from .errors import ProvisionerConfigError
from .hosts import HostEntry

PROVISIONER_NAME = "ssh-provisioner"
PYTHON_ARGV = ["python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"]
_NAME = re.compile(r"^[a-z0-9._-]+$", re.IGNORECASE)


@dataclass(frozen=True)
class InstalledSpec:
    name: str
    path: str
    display_name: str
    config: dict[str, Any]
    argv: list[str]

    @property
    def hosts(self) -> list[str]:
        return [HostEntry.parse(item).name for item in self.config.get("hosts", [])]

    @property
    def policy(self) -> str:
        return str(self.config.get("policy", "least-kernels"))


def build_kernelspec(
    *,
    hosts: list[str],
    display_name: str,
    language: str = "python",
    argv: list[str] | None = None,
    config: dict[str, Any] | None = None,
    curve: bool = False,
) -> dict[str, Any]:
    """kernel.json content: ``argv`` runs on the host; ``config`` holds provisioner options;
    ``curve`` declares that the kernel speaks CurveZMQ (jupyter_client's
    ``metadata.supported_encryption``), for managers with ``transport_encryption``."""
    if not hosts:
        raise ProvisionerConfigError("at least one host is needed")
    for host in hosts:
        HostEntry.parse(host)  # a bad destination is an error now, not at kernel start
    argv = list(argv or PYTHON_ARGV)
    if not any("{connection_file}" in arg for arg in argv):
        raise ProvisionerConfigError("the kernel argv must contain {connection_file}")
    return {
        "argv": argv,
        "display_name": display_name,
        "language": language,
        "interrupt_mode": "signal",
        "metadata": {
            **({"supported_encryption": ["curve"]} if curve else {}),
            "kernel_provisioner": {
                "provisioner_name": PROVISIONER_NAME,
                "config": {"hosts": list(hosts), **(config or {})},
            },
        },
    }


def install_kernelspec(
    name: str,
    spec: dict[str, Any],
    *,
    user: bool = False,
    prefix: str | None = None,
    manager: KernelSpecManager | None = None,
) -> tuple[str, bool]:
    """Install (or replace) kernelspec ``name``; returns (its directory, whether it replaced)."""
    if not _NAME.match(name):
        raise ProvisionerConfigError(
            f"kernelspec name {name!r}: use letters, digits, '.', '_' and '-' only"
        )
    manager = manager or KernelSpecManager()
    try:
        manager.get_kernel_spec(name)
        replaced = True
    except NoSuchKernel:
        replaced = False
    with tempfile.TemporaryDirectory(prefix="sshp-spec-") as source:
        with open(os.path.join(source, "kernel.json"), "w", encoding="utf-8") as f:
            json.dump(spec, f, indent=1)
        path = manager.install_kernel_spec(source, name, user=user, replace=True, prefix=prefix)
    return path, replaced


def installed_specs(manager: KernelSpecManager | None = None) -> list[InstalledSpec]:
    """Installed kernelspecs whose provisioner is ssh-provisioner."""
    manager = manager or KernelSpecManager()
    found = []
    for name, entry in sorted(manager.get_all_specs().items()):
        spec = entry.get("spec", {})
        provisioner = spec.get("metadata", {}).get("kernel_provisioner", {})
        if provisioner.get("provisioner_name") == PROVISIONER_NAME:
            config = provisioner.get("config") or {}
            found.append(
                InstalledSpec(
                    name,
                    entry["resource_dir"],
                    spec.get("display_name", name),
                    config,
                    list(spec.get("argv") or []),
                )
            )
    return found
