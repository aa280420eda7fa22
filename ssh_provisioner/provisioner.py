"""SSHProvisioner: traits and lifecycle glue between jupyter_client and the remote kernel."""

from __future__ import annotations

import asyncio
import base64
import difflib
import fnmatch
import os
import posixpath
import signal
import time
import uuid
from dataclasses import dataclass
from typing import Any

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase
from traitlets import Bool, CaselessStrEnum, Dict, Float, Int, List, TraitError, Unicode

from .errors import HostSelectionError, ProvisionerConfigError
from .hosts import Host
from .pool import Lease, check_connect_options, get_pool
from .remote import Handshake, RemoteKernel, start_launcher
from .tunnels import KernelTunnels

# Forwarded from the launch request whatever forward_env says: what a kernel needs from
# its client.  Everything else in the request env is the *server's* environment.
ALWAYS_FORWARDED = ("JPY_SESSION_NAME", "KERNEL_*")
MAX_RESOURCE_BYTES = 1 << 20
_BASE_INIT_ARGS = frozenset({"kernel_id", "kernel_spec", "parent", "config", "log"})


@dataclass(frozen=True)
class LaunchPlan:
    """Everything pre_launch decided; launch_kernel carries it out."""

    argv: list[str]
    env: dict[str, str]
    env_templates: list[tuple[str, str]]
    resource_files: dict[str, str]


class SSHProvisioner(KernelProvisionerBase):
    """Runs the kernel on a remote host over SSH, as if it were local."""

    hosts = List(
        Unicode(),
        config=True,
        help="SSH destinations, each [user@]host[:port] or a ~/.ssh/config Host alias. "
        "The kernel runs on the first (host selection policies build on this).",
    )
    connect_options = Dict(
        config=True,
        help="Keyword arguments passed to asyncssh.connect (client_keys, known_hosts, "
        "username, config, ...). The default honours ~/.ssh/config, the SSH agent and "
        "~/.ssh/known_hosts. Host keys are always checked: known_hosts may not be null.",
    )
    remote_python = Unicode(
        "python3",
        config=True,
        help="Interpreter that runs the launcher on the host; also replaces a kernelspec "
        "argv[0] of 'python' or 'python3'. An absolute path avoids login-shell PATH games.",
    )
    remote_cwd = Unicode(
        "", config=True, help="Working directory of the kernel on the host ('' = remote home)."
    )
    remote_env = Dict(
        value_trait=Unicode(),
        config=True,
        help="Environment variables set for the kernel on the host, after the kernelspec "
        "env; ${VAR} refers to the host's environment.",
    )
    forward_env = List(
        Unicode(),
        config=True,
        help="Names (fnmatch patterns allowed) of variables forwarded from the launch "
        "request's env to the kernel, in addition to JPY_SESSION_NAME and KERNEL_*. "
        "Nothing else crosses over: the host's login environment is the base.",
    )
    remote_transport = CaselessStrEnum(
        ["tcp", "ipc"],
        default_value="tcp",
        config=True,
        help="How the kernel listens on the host: 'tcp' (127.0.0.1 ports) or 'ipc' (Unix "
        "sockets in a private 0700 directory; use this on hosts shared with other users).",
    )
    connect_timeout = Float(10.0, config=True, help="Seconds allowed to open an SSH connection.")
    launch_timeout = Float(
        60.0, config=True, help="Seconds allowed from exec of the launcher to a listening kernel."
    )
    orphan_timeout = Float(
        30.0,
        config=True,
        help="Seconds a kernel outlives its launcher's SSH channel before the launcher "
        "kills it (a lost client must not leave a kernel running forever).",
    )
    keepalive_interval = Float(
        15.0,
        config=True,
        help="Seconds between SSH keepalives (0 disables), unless connect_options sets it.",
    )
    keepalive_count_max = Int(
        3, config=True, help="Unanswered keepalives before a connection counts as dead."
    )
    prewarm_launcher = Bool(
        True,
        config=True,
        help="Keep one idle launcher per host and interpreter ready, so that the next "
        "kernel start skips the login shell's and Python's start-up.",
    )
    pool_idle_timeout = Float(
        60.0,
        config=True,
        help="Seconds a pooled SSH connection stays open after its last kernel is gone "
        "(warm starts reuse it).",
    )

    def __init__(self, **kwargs: Any) -> None:
        known = set(self.class_trait_names(config=True)) | _BASE_INIT_ARGS
        unknown = sorted(set(kwargs) - known)
        spec = kwargs.get("kernel_spec")
        where = f"kernelspec {getattr(spec, 'display_name', None) or '?'!r}"
        if unknown:
            hints = []
            for name in unknown:
                close = difflib.get_close_matches(name, sorted(known - _BASE_INIT_ARGS), n=1)
                hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ProvisionerConfigError(
                f"{where}: unknown ssh-provisioner option(s) {', '.join(hints)}; valid: "
                f"{', '.join(sorted(self.class_trait_names(config=True)))}"
            )
        try:
            super().__init__(**kwargs)
        except TraitError as exc:
            raise ProvisionerConfigError(f"{where}: invalid ssh-provisioner option: {exc}") from exc
        self._hosts = self._parse_hosts(where)
        check_connect_options(self.connect_options)
        self._plan: LaunchPlan | None = None
        self._lease: Lease | None = None
        self._kernel: RemoteKernel | None = None
        self._tunnels: KernelTunnels | None = None
        self._host: Host | None = None
        self._handshake: Handshake | None = None
        self._reaped = False
        self._restart_ports: dict[str, int] | None = None

    def _parse_hosts(self, where: str) -> list[Host]:
        try:
            return [Host.parse(entry) for entry in self.hosts]
        except ProvisionerConfigError as exc:
            raise ProvisionerConfigError(f"{where}: {exc}") from exc

    # -- host selection (the seam host policies plug into) ----------------------------

    def select_host(self) -> Host:
        """Choose where the next kernel runs."""
        if not self._hosts:
            raise HostSelectionError("no hosts configured: set the 'hosts' option")
        return self._hosts[0]

    # -- KernelProvisionerBase -------------------------------------------------------

    @property
    def has_process(self) -> bool:
        return self._kernel is not None and not self._reaped

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        """Called by KernelManager.pre_start_kernel on every start and restart.

        Builds the launch plan: argv (templates resolved on the host), the env that
        crosses over, and the kernelspec's small resource files.
        """
        request_env: dict[str, str] = dict(kwargs.pop("env", None) or {})
        extra_arguments = list(kwargs.pop("extra_arguments", None) or [])
        kwargs.pop("cwd", None)  # a path on *this* machine; remote_cwd applies on the host
        argv = list(self.kernel_spec.argv) + extra_arguments
        if not argv:
            raise ProvisionerConfigError(
                f"kernelspec {self.kernel_spec.display_name!r}: empty argv"
            )
        if argv[0] in ("python", "python3"):
            argv[0] = self.remote_python
        patterns = (*ALWAYS_FORWARDED, *self.forward_env)
        forwarded = {
            name: value
            for name, value in request_env.items()
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
        }
        templates = [*self.kernel_spec.env.items(), *self.remote_env.items()]
        resource_files = await asyncio.to_thread(
            _read_resource_files, self.kernel_spec.resource_dir
        )
        self._plan = LaunchPlan(argv, forwarded, templates, resource_files)
        kwargs["cmd"] = argv
        return kwargs

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        """Called by KernelManager._async_launch_kernel after pre_launch.

        Leases the host's pooled connection, runs the launcher there, waits for its
        handshake, opens the five forwards on the same connection and returns
        connection info that points at the LOCAL ends of the forwards.
        """
        if self._plan is None:
            raise RuntimeError("launch_kernel called before pre_launch")
        started = time.perf_counter()
        host = self.select_host()
        lease = await get_pool().lease(
            host, self._connect_options(), connect_timeout=self.connect_timeout
        )
        kernel: RemoteKernel | None = None
        python = self.remote_python
        try:
            kernel = await RemoteKernel.start(
                lease.connection,
                host,
                python=python,
                spec=self._launch_spec(cmd),
                kernel_id=str(self.kernel_id),
                timeout=self.launch_timeout,
                spare=lease.take_spare(python) if self.prewarm_launcher else None,
            )
            tunnels = await KernelTunnels.open(
                lease.connection, host, kernel.endpoints, preferred_ports=self._restart_ports
            )
        except BaseException:
            if kernel is not None:
                await kernel.aclose()
            lease.release(self.pool_idle_timeout)
            raise
        if self.prewarm_launcher:
            lease.prepare_spare(python, lambda connection: start_launcher(connection, python))
        self._host, self._lease, self._kernel, self._tunnels = host, lease, kernel, tunnels
        self._handshake = kernel.ready
        self._reaped = False
        self._restart_ports = None
        self.connection_info = self._local_connection_info(tunnels.local_ports)
        self.log.info(
            "kernel %s on %s (%s): pid %d, %s transport, ready in %.0f ms",
            self.kernel_id,
            host,
            self._handshake.hostname,
            self._handshake.pid,
            self.remote_transport,
            (time.perf_counter() - started) * 1000,
        )
        return self.connection_info

    async def poll(self) -> int | None:
        """Called by KernelManager.is_alive (and so the KernelRestarter): no round trip."""
        return self._kernel.poll() if self._kernel is not None else 0

    async def wait(self) -> int | None:
        """Called by KernelManager while shutting down; callers bound it with a timeout."""
        if self._kernel is None:
            return 0
        status = await self._kernel.wait()
        self._reaped = True
        return status

    async def send_signal(self, signum: int) -> None:
        """Called by KernelManager.signal_kernel / interrupt_kernel (interrupt_mode signal)."""
        if self._kernel is not None:
            await self._kernel.send_signal(signum)

    async def kill(self, restart: bool = False) -> None:
        """Called by KernelManager._kill_kernel: SIGKILL to the kernel's process group."""
        await self.send_signal(signal.SIGKILL)

    async def terminate(self, restart: bool = False) -> None:
        """Called by KernelManager.finish_shutdown when the kernel ignores shutdown_request."""
        await self.send_signal(signal.SIGTERM)

    async def cleanup(self, restart: bool = False) -> None:
        """Called by KernelManager.cleanup_resources after every shutdown; idempotent.

        Closes the forwards (remembering their ports for a restart), waits until the
        launcher has removed the kernel and its runtime dir, and releases the pooled
        connection (kept open for a restart or reuse).
        """
        tunnels, kernel, lease = self._tunnels, self._kernel, self._lease
        self._tunnels = self._kernel = self._lease = None
        self._reaped = True
        if tunnels is not None:
            if restart:
                self._restart_ports = tunnels.local_ports
            await tunnels.aclose()
        if kernel is not None:
            await kernel.aclose()
        if lease is not None:
            lease.release(self.pool_idle_timeout)

    async def get_provisioner_info(self) -> dict[str, Any]:
        """Called by applications that persist kernels; carries where the kernel runs."""
        info: dict[str, Any] = await super().get_provisioner_info()
        handshake = self._handshake
        info["host"] = str(self._host) if self._host else None
        info["remote_transport"] = self.remote_transport
        if handshake is not None:
            info.update(
                hostname=handshake.hostname,
                pid=handshake.pid,
                pgid=handshake.pgid,
                launcher_pid=handshake.launcher_pid,
                endpoints=dict(handshake.endpoints),
                runtime_dir=handshake.runtime_dir,
                remote_connection_file=handshake.connection_file,
                remote_cwd=handshake.cwd,
                remote_home=handshake.home,
            )
        return info

    async def load_provisioner_info(self, provisioner_info: dict[str, Any]) -> None:
        """Inverse of get_provisioner_info (reattaching is built on top of this)."""
        await super().load_provisioner_info(provisioner_info)
        if provisioner_info.get("host"):
            self._host = Host.parse(provisioner_info["host"])

    def resolve_path(self, path: str) -> str | None:
        """Resolve ``path`` against the kernel's working directory on the host."""
        handshake = self._handshake
        if handshake is None:
            return None
        if path == "~" or path.startswith("~/"):
            path = handshake.home + path[1:]
        return posixpath.normpath(posixpath.join(handshake.cwd, path))

    # -- helpers -------------------------------------------------------------------

    def _connect_options(self) -> dict[str, Any]:
        options = dict(self.connect_options)
        options.setdefault("keepalive_interval", self.keepalive_interval)
        options.setdefault("keepalive_count_max", self.keepalive_count_max)
        return options

    def _session(self) -> Any:
        return getattr(self.parent, "session", None)

    def _launch_spec(self, argv: list[str]) -> dict[str, Any]:
        if self._plan is None:
            raise RuntimeError("launch_kernel called before pre_launch")
        session = self._session()
        key = session.key if session is not None else uuid.uuid4().hex.encode()
        return {
            "argv": argv,
            "env": self._plan.env,
            "env_templates": self._plan.env_templates,
            "resource_files": self._plan.resource_files,
            "cwd": self.remote_cwd or None,
            "transport": self.remote_transport,
            "kernel_id": str(self.kernel_id),
            "orphan_timeout": self.orphan_timeout,
            "ready_timeout": self.launch_timeout,
            "connection": {
                "key": key.decode(),
                "signature_scheme": getattr(session, "signature_scheme", "hmac-sha256"),
                "kernel_name": getattr(self.parent, "kernel_name", ""),
            },
        }

    def _local_connection_info(self, ports: dict[str, int]) -> KernelConnectionInfo:
        session = self._session()
        info: KernelConnectionInfo = {
            "transport": "tcp",
            "ip": "127.0.0.1",
            "shell_port": ports["shell"],
            "iopub_port": ports["iopub"],
            "stdin_port": ports["stdin"],
            "control_port": ports["control"],
            "hb_port": ports["hb"],
            "signature_scheme": getattr(session, "signature_scheme", "hmac-sha256"),
            "kernel_name": getattr(self.parent, "kernel_name", ""),
        }
        if session is not None:
            info["key"] = session.key
        return info


def _read_resource_files(resource_dir: str | None) -> dict[str, str]:
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
