"""The exception tree, and the one place where asyncssh and OS errors are translated."""

from __future__ import annotations

import asyncio
import shlex
import socket
from collections.abc import Sequence

import asyncssh


class SSHProvisionerError(Exception):
    """Root of every error this package raises.  ``host`` names the SSH destination."""

    def __init__(self, message: str, *, host: str | None = None) -> None:
        super().__init__(message)
        self.host = host


class ProvisionerConfigError(SSHProvisionerError, ValueError):
    """The provisioner's configuration (kernelspec ``config`` block or Jupyter config) is wrong."""


class OptionRefused(ProvisionerConfigError):
    """A user's choice at start (``user_options``) outside what the kernelspec allows:
    nothing was started."""


class HostSelectionError(SSHProvisionerError):
    """No configured host could be chosen for the kernel."""


class SSHConnectError(SSHProvisionerError, ConnectionError):
    """The SSH connection to a host could not be made or was lost."""


class AuthenticationError(SSHConnectError):
    """The host refused every credential offered.  ``prompted``: it asked a
    keyboard-interactive question (a second factor) that went unanswered or whose
    answer it refused: such a host is not asked again for a while (sites count these)."""

    def __init__(self, message: str, *, host: str | None = None, prompted: bool = False) -> None:
        super().__init__(message, host=host)
        self.prompted = prompted


class ControlMasterError(AuthenticationError):
    """The host is to be reached through the user's OpenSSH master (use_control_master
    'always'), and none answers: the message says the command that opens one."""


class HostKeyError(SSHConnectError):
    """The host's key is unknown or differs from the one on record."""


class KernelUnreachable(SSHConnectError):
    """The kernel's host cannot be reached right now (the provisioner is reconnecting):
    what was asked of the kernel was not delivered."""


class SessionLimitError(SSHConnectError):
    """The host refused another session channel on a connection (sshd's MaxSessions).

    The connection itself is fine; the pool opens another one to the same host."""


def session_open_error(host: str, purpose: str, exc: BaseException) -> SSHConnectError:
    """Translate a failed session-channel open.  A live connection whose server refuses
    the channel is at its MaxSessions: OpenSSH 9.2 answers "open failed" with the code
    connect-failed, others administratively-prohibited; a lost connection raises
    something else."""
    if isinstance(exc, asyncssh.ChannelOpenError):
        return SessionLimitError(
            f"SSH to {host}: the server refused another session for {purpose} on this "
            f"connection (sshd's MaxSessions, 10 by default): {exc.reason}",
            host=host,
        )
    return SSHConnectError(
        f"SSH to {host}: cannot open a session channel for {purpose}: {exc}", host=host
    )


class LaunchError(SSHProvisionerError):
    """The kernel could not be started on the host."""

    def __init__(self, message: str, *, host: str | None = None, stderr_tail: str = "") -> None:
        super().__init__(message, host=host)
        self.stderr_tail = stderr_tail


class LaunchTimeout(LaunchError, TimeoutError):
    """The kernel did not report ready within ``launch_timeout``."""


class SlurmError(SSHProvisionerError):
    """Slurm refused or lost a kernel's job (sbatch failed, the queue wait passed
    ``queue_timeout``); the message names the login node, the job and Slurm's words."""

    def __init__(self, message: str, *, host: str | None = None, job_id: str | None = None):
        super().__init__(message, host=host)
        self.job_id = job_id


class TunnelError(SSHProvisionerError):
    """A local forward to the kernel's endpoints could not be opened."""


class RemoteCommandError(SSHProvisionerError):
    """A command run on the host failed."""

    def __init__(
        self,
        message: str,
        *,
        host: str,
        argv: Sequence[str],
        exit_status: int | None,
        stderr_tail: str = "",
    ) -> None:
        super().__init__(message, host=host)
        self.argv = list(argv)
        self.exit_status = exit_status
        self.stderr_tail = stderr_tail


def translate_connect_error(
    host: str,
    exc: BaseException,
    *,
    known_host_entries: int | None = None,
    known_hosts_name: str | None = None,
) -> SSHConnectError:
    """Map an exception raised while connecting to ``host`` to our tree.

    ``known_host_entries`` is how many keys the client trusts for this host; it tells
    an unknown host key (0) from a changed one (> 0).  ``known_hosts_name`` is how
    known_hosts spells the host (``[name]:port`` for a non-default port).
    """
    entry = shlex.quote(known_hosts_name or host)
    where = f"SSH to {host}"
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        if known_host_entries:
            return HostKeyError(
                f"{where}: the host key has CHANGED and does not match the key on record in "
                f"known_hosts; someone may be intercepting the connection, or the host was "
                f"reinstalled. Verify the new key out of band, then replace the old entry "
                f"(ssh-keygen -R {entry}). ({exc.reason})",
                host=host,
            )
        return HostKeyError(
            f"{where}: the host key is unknown (no entry for {entry} in known_hosts) and "
            f"unknown keys are never accepted. Verify the key's fingerprint and add it, e.g. "
            f"by connecting once with ssh. ({exc.reason})",
            host=host,
        )
    if isinstance(exc, asyncssh.PermissionDenied):
        return AuthenticationError(
            f"{where}: authentication refused ({exc.reason}); check the user name, the "
            f"keys offered (client_keys / IdentityFile / agent) and the host's "
            f"authorized_keys",
            host=host,
        )
    if isinstance(exc, asyncssh.DisconnectError):
        return SSHConnectError(f"{where}: the host closed the connection: {exc.reason}", host=host)
    if isinstance(exc, asyncssh.Error):
        return SSHConnectError(f"{where}: {exc.reason}", host=host)
    if isinstance(exc, socket.gaierror):
        return SSHConnectError(
            f"{where}: cannot resolve the host name ({exc.strerror}); check the name or "
            f"the Host alias in ~/.ssh/config",
            host=host,
        )
    if isinstance(exc, ConnectionRefusedError):
        return SSHConnectError(
            f"{where}: connection refused; is sshd running on that host and port?", host=host
        )
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return SSHConnectError(f"{where}: timed out while connecting", host=host)
    if isinstance(exc, OSError):
        return SSHConnectError(f"{where}: {exc.strerror or exc}", host=host)
    if isinstance(exc, ValueError | TypeError):
        # asyncssh rejects bad options (an unreadable key file, an unknown option...)
        return SSHConnectError(f"{where}: bad connection options: {exc}", host=host)
    return SSHConnectError(f"{where}: {type(exc).__name__}: {exc}", host=host)
