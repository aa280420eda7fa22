"""SessionSettings: what a session needs of the provisioner's configuration."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from .forwards import ForwardSettings
from .hosts import Host
from .slurm import SlurmSettings


@dataclass(frozen=True)
class SessionSettings:
    """What a session needs to know of the provisioner's configuration, resolved for
    its host."""

    kernel_id: str
    host_name: str
    host: Host
    connect_options: dict[str, Any] = field(hash=False)
    python: str
    connect_timeout: float
    launch_timeout: float
    reconnect_timeout: float
    idle_timeout: float
    ping_interval: float
    prewarm: bool
    slurm: SlurmSettings | None = None  # the kernel runs as a Slurm job, via this login node
    forwards: ForwardSettings | None = None  # forward the ports the kernel opens (or not)
    kernel_log_level: int = logging.DEBUG  # of the kernel's stderr in this process's log
