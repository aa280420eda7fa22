"""Run Jupyter kernels on remote hosts over SSH: a jupyter_client kernel provisioner."""

import warnings

with warnings.catch_warnings():
    # cryptography >= 47 deprecates DSA, which asyncssh still imports: a warning on
    # every command a user runs, about nothing they can change.
    warnings.filterwarnings("ignore", message="DSA is deprecated", category=UserWarning)
    import asyncssh  # noqa: F401

from .engine import shutdown_engine
from .errors import (
    AuthenticationError,
    ControlMasterError,
    HostKeyError,
    HostSelectionError,
    KernelUnreachable,
    LaunchError,
    LaunchTimeout,
    OptionRefused,
    ProvisionerConfigError,
    RemoteCommandError,
    SlurmError,
    SSHConnectError,
    SSHProvisionerError,
    TunnelError,
)
from .hosts import Host
from .provisioner import SSHProvisioner

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "ControlMasterError",
    "Host",
    "HostKeyError",
    "HostSelectionError",
    "KernelUnreachable",
    "LaunchError",
    "LaunchTimeout",
    "OptionRefused",
    "ProvisionerConfigError",
    "RemoteCommandError",
    "SSHConnectError",
    "SSHProvisioner",
    "SSHProvisionerError",
    "SlurmError",
    "TunnelError",
    "__version__",
    "shutdown_engine",
]
