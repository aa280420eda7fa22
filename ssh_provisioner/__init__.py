"""Run Jupyter kernels on remote hosts over SSH: a jupyter_client kernel provisioner."""

from .engine import shutdown_engine
from .errors import (
    AuthenticationError,
    HostKeyError,
    HostSelectionError,
    KernelUnreachable,
    LaunchError,
    LaunchTimeout,
    ProvisionerConfigError,
    RemoteCommandError,
    SSHConnectError,
    SSHProvisionerError,
    TunnelError,
)
from .hosts import Host
from .provisioner import SSHProvisioner

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "Host",
    "HostKeyError",
    "HostSelectionError",
    "KernelUnreachable",
    "LaunchError",
    "LaunchTimeout",
    "ProvisionerConfigError",
    "RemoteCommandError",
    "SSHConnectError",
    "SSHProvisioner",
    "SSHProvisionerError",
    "TunnelError",
    "__version__",
    "shutdown_engine",
]
