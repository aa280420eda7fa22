"""SSHProvisioner: traits and lifecycle glue between jupyter_client and the remote kernel."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import difflib
import fnmatch
import os
import posixpath
import secrets
import signal
import time
from dataclasses import dataclass
from typing import Any, cast

from asyncssh.misc import parse_time_interval
from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase
from traitlets import (
    Bool,
    CaselessStrEnum,
    Dict,
    Float,
    Int,
    List,
    TraitError,
    Unicode,
    Union,
)

from .encryption import CurveKeys, adopt, negotiate
from .engine import get_engine
from .errors import (
    HostSelectionError,
    KernelUnreachable,
    ProvisionerConfigError,
    SessionLimitError,
    SSHConnectError,
)
from .handshake import Handshake
from .host.spec import DEFAULT_OUTAGE_BUFFER, MIN_OUTAGE_BUFFER
from .hosts import HostEntry
from .kbdint import AUTH_COOLDOWN, KBDINT, parse_rules
from .master import MODES as MASTER_MODES
from .master import USE_CONTROL_MASTER, mode_of
from .placement import PlacementRequest, Tries
from .policies import HostPolicy, Placement, load_policy
from .pool import Lease, check_connect_options
from .remote import run_probe
from .seat import KernelSeat
from .settings import SessionSettings
from .slurm import SlurmJob, SlurmSettings
from .sshconfig import ALLOW_UNCHECKED

# Forwarded from the launch request whatever forward_env says: what a kernel needs from
# its client.  Everything else in the request env is the *server's* environment.
ALWAYS_FORWARDED = ("JPY_SESSION_NAME", "KERNEL_*")
MAX_RESOURCE_BYTES = 1 << 20
_BASE_INIT_ARGS = frozenset({"kernel_id", "kernel_spec", "parent", "config", "log"})


@dataclass(frozen=True)
class LaunchPlan:
    """What pre_launch took from the start request; launch_kernel carries it out."""

    argv: list[str]
    env: dict[str, str]
    resource_files: dict[str, str]
    pinned_host: str | None = None
    labels: frozenset[str] = frozenset()


class SSHProvisioner(KernelProvisionerBase):
    """Runs the kernel on a remote host over SSH, as if it were local."""

    hosts = List(
        Union([Unicode(), Dict()]),
        config=True,
        help="Where kernels may run. Each entry is an SSH destination, [user@]host[:port] "
        "or a ~/.ssh/config Host alias, or a dict with 'host' and per-host settings: "
        "max_kernels, labels, remote_python, remote_cwd, remote_env, remote_transport, "
        "connect_options, kbdint, use_control_master (these win over the provisioner-wide "
        "values).",
    )
    policy = Unicode(
        "least-kernels",
        config=True,
        help="How a host is chosen: round-robin, random, least-kernels, least-load, "
        "most-free-gpu-memory, first-available, an entry point of the group "
        "ssh_provisioner.policies, or a dotted path pkg.module:Class.",
    )
    max_kernels = Int(0, config=True, help="Kernels this server may run per host (0 = no limit).")
    max_launch_attempts = Int(
        3, config=True, help="Hosts tried, one after another, when connecting fails."
    )
    host_cooldown = Float(
        30.0,
        config=True,
        help="Seconds a host that could not be reached is passed over while others can "
        "take the kernel.",
    )
    probe_ttl = Float(
        10.0, config=True, help="Seconds a host probe (load, GPUs) is reused by policies."
    )
    restart_same_host = Bool(
        True,
        config=True,
        help="A restarted kernel stays on its host (unless that host is down or full).",
    )
    allow_any_host = Bool(
        False,
        config=True,
        help="Let a start request name (KERNEL_SSH_HOST) a host that is not in 'hosts'. "
        "Off by default: users cannot send kernels to arbitrary machines.",
    )
    allow_unchecked_host_keys = Bool(
        False,
        config=True,
        help="Admin option, off by default: let an ssh config line (UserKnownHostsFile "
        "none or /dev/null, StrictHostKeyChecking no) or known_hosts=null switch "
        "host-key checking off. Without it such a host is refused with an error naming "
        "the line: a kernel's code and secrets would go to whoever answers.",
    )
    kbdint: List[Any] = List(
        config=True,
        help="How to answer keyboard-interactive prompts (a second factor) without a "
        "terminal, asked once per pooled connection: rules {'prompt': REGEX, 'answer': "
        "TEXT} or {'prompt': REGEX, 'command': ARGV} (its stdout is the answer: a TOTP "
        "generator, a password manager), or 'REGEX=TEXT' / 'REGEX=!COMMAND'. Answers "
        "never appear in logs or errors; a refused one is not retried for host_cooldown.",
    )
    use_control_master = CaselessStrEnum(
        list(MASTER_MODES),
        default_value="auto",
        config=True,
        help="Reuse the user's own OpenSSH master for a host (opened by hand with `ssh -fN "
        "HOST`, typing the second factor once), found at the host's ControlPath as `ssh -G` "
        "reports it: 'auto' uses it when one runs, 'always' never logs in itself (no master "
        "is an error naming the command to open one), 'never' always connects itself.",
    )
    slurm = Dict(
        config=True,
        help="Run each kernel as a Slurm job: 'hosts' are then the cluster's login nodes. "
        "Keys: partition, gpus, cpus_per_task, mem, time, account, qos, constraint, "
        "reservation, job_name ('jupyter-{kernel_id}'), extra_directives (sbatch options), "
        "prologue (a bash script's lines, run as written before the kernel on the compute "
        "node; its last cd is the kernel's cwd unless remote_cwd is set), queue_timeout "
        "(seconds a job may wait in the queue; 0 = no limit), warn_before_walltime "
        "(seconds; 300), poll_interval (seconds between job-state checks; 5), "
        "empty_job_timeout (a job with no kernel in it at two checks this many seconds "
        "apart ends itself; 120, 0 = never). A restart is a new step in the same job; "
        "shutdown cancels it.",
    )
    connect_options = Dict(
        config=True,
        help="Keyword arguments passed to asyncssh.connect (client_keys, known_hosts, "
        "username, config, ...). The default honours ~/.ssh/config, the SSH agent and "
        "~/.ssh/known_hosts; ProxyJump hops get the same options. Host keys are always "
        "checked: known_hosts may not be null (see allow_unchecked_host_keys).",
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
        900.0,
        config=True,
        help="Seconds a kernel outlives its client (its launcher's SSH channel lost, the "
        "server gone) waiting to be reattached, before the launcher kills it. Long "
        "enough for a laptop to sleep; 0 kills at once.",
    )
    reconnect_timeout = Float(
        300.0,
        config=True,
        help="Seconds the provisioner keeps trying to reconnect and reattach to a kernel "
        "whose SSH connection was lost (it reports the kernel alive meanwhile); after "
        "that the kernel counts as dead. 0 disables reattaching.",
    )
    outage_buffer = Int(
        DEFAULT_OUTAGE_BUFFER,
        min=MIN_OUTAGE_BUFFER,
        config=True,
        help="Bytes of output a kernel's launcher keeps, for all its client connections "
        "together, while they cannot be reached (a lost connection being reattached), "
        "delivered when they are back (at least 4 MiB: it also covers what is on its "
        "way). Past it, whole IOPub output messages are dropped, and the client's output "
        "says how many; other messages are kept for a quarter more, then the kernel's own "
        "socket holds them; replies are never dropped (the kernel waits instead). A "
        "client that is merely slow gets what a ZMQ socket gives a slow peer.",
    )
    keepalive_interval = Float(
        15.0,
        config=True,
        help="Seconds between SSH keepalives (0 disables), unless connect_options sets it. "
        "The launcher on the host is pinged at the same pace and counts a client silent "
        "for keepalive_count_max + 1 intervals as gone (a cut link brings it no EOF).",
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
        try:
            self._entries = [self._with_defaults(HostEntry.parse(item)) for item in self.hosts]
            self._policy: HostPolicy = load_policy(self.policy)
            allow = self.allow_unchecked_host_keys
            parse_rules(self.kbdint)
            for entry in self._entries:
                parse_rules(entry.override("kbdint", []))
                mode_of({USE_CONTROL_MASTER: entry.override("use_control_master", None)})
            self._slurm = SlurmSettings.parse(self.slurm) if self.slurm else None
            check_connect_options(self.connect_options, allow_unchecked=allow)
            for entry in self._entries:
                check_connect_options(entry.override("connect_options", {}), allow_unchecked=allow)
        except ProvisionerConfigError as exc:
            raise ProvisionerConfigError(f"{where}: {exc}") from exc
        self._plan: LaunchPlan | None = None
        self.seat = KernelSeat(str(self.kernel_id))  # what outlives restarts (see seat)
        self._standalone_key: bytes | None = None
        self._curve: CurveKeys | None = None

    def _with_defaults(self, entry: HostEntry) -> HostEntry:
        if entry.max_kernels is None and self.max_kernels > 0:
            return HostEntry(entry.host, self.max_kernels, entry.labels, entry.overrides)
        return entry

    # -- host selection ----------------------------------------------------------------

    def _candidates(self, pinned: str | None, labels: frozenset[str]) -> list[HostEntry]:
        """The configured hosts a start may use, after KERNEL_SSH_HOST / _LABELS."""
        if not self._entries and not pinned:
            raise HostSelectionError("no hosts configured: set the 'hosts' option")
        candidates = self._entries
        if pinned:
            candidates = [entry for entry in self._entries if entry.matches(pinned)]
            if not candidates:
                if not self.allow_any_host:
                    names = ", ".join(entry.name for entry in self._entries)
                    raise HostSelectionError(
                        f"KERNEL_SSH_HOST={pinned!r} is not one of the configured hosts "
                        f"({names}); an admin can set allow_any_host to permit any host"
                    )
                candidates = [self._with_defaults(HostEntry.parse(pinned))]
        if labels:
            labelled = [entry for entry in candidates if labels <= entry.labels]
            if not labelled:
                raise HostSelectionError(
                    f"no host has the labels {sorted(labels)} (KERNEL_SSH_LABELS); hosts: "
                    + ", ".join(f"{e.name} {sorted(e.labels)}" for e in candidates)
                )
            candidates = labelled
        return candidates

    async def _probe(self, entry: HostEntry, command: str) -> str | None:
        """Run a policy's probe on ``entry`` over its pooled connection (engine loop)."""
        host = entry.host

        async def probe(lease: Lease) -> str | None:
            return await run_probe(lease.connection, host, command, self.connect_timeout)

        try:
            _, output = await get_engine().pool.use(
                host,
                self._connect_options(entry),
                probe,
                connect_timeout=self.connect_timeout,
                idle_timeout=self.pool_idle_timeout,
            )
        except SessionLimitError as exc:
            self.log.info("probe on %s failed: %s", entry.name, exc)
            return None
        except SSHConnectError as exc:
            get_engine().placement.mark_unhealthy(entry, str(exc), self.host_cooldown)
            return None
        return output

    # -- KernelProvisionerBase -------------------------------------------------------

    @property
    def has_process(self) -> bool:
        return self.seat.has_process

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        """Called by KernelManager.pre_start_kernel on every start and restart.

        Builds the launch plan: argv (templates resolved on the host), the env that
        crosses over, and the kernelspec's small resource files.
        """
        request_env: dict[str, str] = dict(kwargs.pop("env", None) or {})
        extra_arguments = list(kwargs.pop("extra_arguments", None) or [])
        kwargs.pop("cwd", None)  # a path on *this* machine; remote_cwd applies on the host
        self._curve = negotiate(
            self.parent, kwargs.pop("transport_encryption", None), self.kernel_spec.display_name
        )
        argv = list(self.kernel_spec.argv) + extra_arguments
        if not argv:
            raise ProvisionerConfigError(
                f"kernelspec {self.kernel_spec.display_name!r}: empty argv"
            )
        patterns = (*ALWAYS_FORWARDED, *self.forward_env)
        forwarded = {
            name: value
            for name, value in request_env.items()
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
        }
        resource_files = await asyncio.to_thread(
            _read_resource_files, self.kernel_spec.resource_dir
        )
        labels = request_env.get("KERNEL_SSH_LABELS", "")
        self._plan = LaunchPlan(
            argv,
            forwarded,
            resource_files,
            pinned_host=request_env.get("KERNEL_SSH_HOST") or None,
            labels=frozenset(label.strip() for label in labels.split(",") if label.strip()),
        )
        kwargs["cmd"] = argv
        return kwargs

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        """Called by KernelManager._async_launch_kernel after pre_launch.

        Places the kernel (policy, pinning, limits, health; a restart stays on its host),
        runs the launcher there over the host's pooled connection, waits for its
        handshake, opens the five forwards on the same connection and returns
        connection info that points at the LOCAL ends of the forwards.  A host that
        cannot be reached is passed over for ``host_cooldown`` seconds and the next
        choice is tried, up to ``max_launch_attempts`` hosts.  The work runs on the
        SSH engine's loop, whichever loop (if any) the caller runs.
        """
        if self._plan is None:
            raise RuntimeError("launch_kernel called before pre_launch")
        plan = self._plan
        connection = self._connection_fields()
        seat = self.seat
        previous = seat.placement.entry if seat.placement and self.restart_same_host else None
        request = PlacementRequest(
            self._candidates(plan.pinned_host, plan.labels), self._policy, prefer=previous
        )
        tries = Tries(
            str(self.kernel_id),
            self.max_launch_attempts,
            self.host_cooldown,
            self._probe,
            self.probe_ttl,
        )

        def spec(placement: Placement) -> dict[str, Any]:
            return self._launch_spec(plan, cmd, placement, connection)

        started = time.perf_counter()
        session = await get_engine().run(seat.start(request, tries, self._settings, spec))
        handshake = session.handshake
        entry = seat.placement.entry if seat.placement else None
        self.log.info(
            "kernel %s on %s (%s): pid %d, %s transport, ready in %.0f ms",
            self.kernel_id,
            entry.name if entry else "?",
            handshake.hostname if handshake else "?",
            handshake.pid if handshake else 0,
            entry.override("remote_transport", self.remote_transport) if entry else "?",
            (time.perf_counter() - started) * 1000,
        )
        self.connection_info = self._local_connection_info(session.local_ports)
        return self.connection_info

    async def poll(self) -> int | None:
        """Called by KernelManager.is_alive (and so the KernelRestarter): no round trip,
        no hop to the engine (the session's state is read as it is)."""
        session = self.seat.session
        return session.poll() if session is not None else 0

    async def wait(self) -> int | None:
        """Called by KernelManager while shutting down; callers bound it with a timeout."""
        session = self.seat.session
        if session is None:
            return 0
        status = await get_engine().run(session.wait())
        self.seat.reaped = True
        return status

    async def send_signal(self, signum: int) -> None:
        """Called by KernelManager.signal_kernel / interrupt_kernel (interrupt_mode signal).

        Raises KernelUnreachable while the host cannot be reached (nothing is queued: a
        late interrupt could stop a cell the user ran afterwards), and
        ProvisionerConfigError for a number that is no signal."""
        try:
            signal.Signals(signum)
        except ValueError:
            raise ProvisionerConfigError(
                f"kernel {self.kernel_id}: {signum!r} is not a signal number"
            ) from None
        session = self.seat.session
        if session is None:
            return
        try:
            await get_engine().run(session.send_signal(signum))
        except KernelUnreachable as exc:
            # KernelManager.shutdown_kernel interrupts first: a shutdown goes on.
            if not getattr(self.parent, "shutting_down", False):
                raise
            self.log.warning("%s", exc)

    async def kill(self, restart: bool = False) -> None:
        """Called by KernelManager._kill_kernel: SIGKILL to the kernel's process group.
        An unreachable kernel is abandoned instead (its end is left to the host)."""
        await self._end(signal.SIGKILL)

    async def terminate(self, restart: bool = False) -> None:
        """Called by KernelManager.finish_shutdown when the kernel ignores shutdown_request."""
        await self._end(signal.SIGTERM)

    async def _end(self, signum: int) -> None:
        session = self.seat.session
        if session is not None:
            await get_engine().run(session.end(signum))

    async def cleanup(self, restart: bool = False) -> None:
        """Called by KernelManager.cleanup_resources after every shutdown; idempotent.

        Waits until the launcher has removed the kernel and its runtime dir, and
        releases the pooled connection (kept open for a restart or reuse).  The local
        ports stay bound for a restart, holding the clients' connections until the new
        kernel is up; otherwise they are closed.  A Slurm kernel's job is cancelled,
        unless this is a restart (the next kernel runs in the same job).
        """
        seat = self.seat
        if seat.session is None and (restart or (seat.ports is None and seat.job is None)):
            seat.reaped = True  # nothing to release: no hop to the engine
            return
        await get_engine().run(seat.release(restart, self._connect_options, self.pool_idle_timeout))

    async def get_provisioner_info(self) -> dict[str, Any]:
        """Called by applications that persist kernels (to reattach from another process).

        Carries where the kernel runs and how to reach it again: host, pids, endpoints,
        runtime dir, the local ports, and the reattach token.  The token, like the session
        key and the CurveZMQ secret key in ``connection_info``, is a secret: store the
        info as privately as a connection file.
        """
        info: dict[str, Any] = await super().get_provisioner_info()
        seat = self.seat
        session, handshake = seat.session, seat.last_handshake()
        entry = seat.placement.entry if seat.placement else None
        info["host"] = entry.name if entry else None
        info["remote_transport"] = (
            entry.override("remote_transport", self.remote_transport) if entry else None
        )
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
                handshake=dataclasses.asdict(handshake),
            )
        if session is not None:
            info["attach_token"] = session.attach_token
            info["local_ports"] = dict(session.local_ports)
        if seat.job is not None:
            info["slurm_job_id"] = seat.job.job_id
        return info

    async def load_provisioner_info(self, provisioner_info: dict[str, Any]) -> None:
        """Reattach to a kernel that another process (or an earlier server) started.

        ``provisioner_info`` is what get_provisioner_info returned there.  The kernel's
        launcher must still be waiting (within its ``orphan_timeout``), and its host must
        be one this provisioner may use (``hosts``, or any with ``allow_any_host``).
        Afterwards the provisioner manages the kernel as if it had started it: the
        forwards listen on the same local ports when they are free, and
        ``connection_info`` says where.
        """
        await super().load_provisioner_info(provisioner_info)
        host_name = provisioner_info.get("host")
        if not host_name or "handshake" not in provisioner_info:
            return  # nothing running to reattach to
        entry = next((e for e in self._entries if e.name == host_name), None)
        if entry is None:
            entry = self._candidates(str(host_name), frozenset())[0]
        handshake = Handshake.from_event(provisioner_info["handshake"])
        token = str(provisioner_info.get("attach_token") or "")
        saved_ports = provisioner_info.get("local_ports") or None
        job_id = provisioner_info.get("slurm_job_id")
        if job_id and self._slurm is not None:
            self.seat.job = SlurmJob(
                str(job_id), self._slurm, kernel_id=str(self.kernel_id), login=entry.name
            )
        session = await get_engine().run(
            self.seat.adopt(entry, self._settings(entry), handshake, token, saved_ports)
        )
        if saved_ports and session.local_ports != saved_ports:
            self.log.warning(
                "kernel %s: local ports %s were taken; now %s (connection_info updated)",
                self.kernel_id, saved_ports, session.local_ports,
            )  # fmt: skip
        saved_info = provisioner_info.get("connection_info") or {}
        self._curve = CurveKeys.from_connection_info(saved_info)
        adopt(self.parent, self._curve)
        key = saved_info.get("key")
        if key and self._session_fields()[0] != _as_bytes(key):
            parent_session = getattr(self.parent, "session", None)
            if parent_session is not None:
                parent_session.key = _as_bytes(key)
            else:
                self._standalone_key = _as_bytes(key)
        self.connection_info = self._local_connection_info(session.local_ports)
        self.log.info(
            "kernel %s on %s: reattached (pid %d)", self.kernel_id, entry.name, handshake.pid
        )

    def resolve_path(self, path: str) -> str | None:
        """Resolve ``path`` against the kernel's working directory on the host."""
        handshake = self.seat.last_handshake()
        if handshake is None:
            return None
        if path == "~" or path.startswith("~/"):
            path = handshake.home + path[1:]
        return posixpath.normpath(posixpath.join(handshake.cwd, path))

    # -- helpers -------------------------------------------------------------------

    def _settings(self, entry: HostEntry) -> SessionSettings:
        return SessionSettings(
            kernel_id=str(self.kernel_id),
            host_name=entry.name,
            host=entry.host,
            connect_options=self._connect_options(entry),
            python=entry.override("remote_python", self.remote_python),
            connect_timeout=self.connect_timeout,
            launch_timeout=self.launch_timeout,
            reconnect_timeout=self.reconnect_timeout,
            idle_timeout=self.pool_idle_timeout,
            ping_interval=self._liveness(entry)[0],
            prewarm=self.prewarm_launcher and self._slurm is None,  # spares: login node's
            slurm=self._slurm,
        )

    def _connect_options(self, entry: HostEntry) -> dict[str, Any]:
        options = {**self.connect_options, **entry.override("connect_options", {})}
        options.setdefault("keepalive_interval", self.keepalive_interval)
        options.setdefault("keepalive_count_max", self.keepalive_count_max)
        if self.allow_unchecked_host_keys:
            options[ALLOW_UNCHECKED] = True
        options[USE_CONTROL_MASTER] = entry.override("use_control_master", self.use_control_master)
        rules = entry.override("kbdint", self.kbdint)
        if rules:
            options[KBDINT] = list(rules)
        options[AUTH_COOLDOWN] = self.host_cooldown  # for a prompt refused or unanswered
        return options

    def _liveness(self, entry: HostEntry) -> tuple[float, float]:
        """(ping interval, the launcher's liveness_timeout): the SSH keepalive's pace, so
        the launcher notices a cut link about when we do.  (0, 0): no keepalives, none."""
        options = self._connect_options(entry)
        value = options.get("keepalive_interval") or 0
        # asyncssh takes seconds or OpenSSH's time format ("1m30s")
        interval = parse_time_interval(value) if isinstance(value, str) else float(value)
        if interval <= 0:
            return 0.0, 0.0
        return interval, interval * (int(options.get("keepalive_count_max") or 3) + 1)

    def _session_fields(self) -> tuple[bytes, str, str]:
        """(key, signature scheme, kernel name): the KernelManager's, or our own when a
        provisioner runs without one (the key then lives as long as this provisioner)."""
        session = getattr(self.parent, "session", None)
        if session is not None:
            key: bytes = session.key
        else:
            if self._standalone_key is None:
                self._standalone_key = secrets.token_hex(32).encode()
            key = self._standalone_key
        scheme = str(getattr(session, "signature_scheme", "hmac-sha256"))
        return key, scheme, str(getattr(self.parent, "kernel_name", ""))

    def _connection_fields(self) -> dict[str, Any]:
        """The connection file's secrets and names, as the host's kernel gets them."""
        key, scheme, kernel_name = self._session_fields()
        return {
            "key": key.decode(),
            "signature_scheme": scheme,
            "kernel_name": kernel_name,
            **(self._curve.connection_fields() if self._curve else {}),
        }

    def _launch_spec(
        self, plan: LaunchPlan, argv: list[str], placement: Placement, connection: dict[str, Any]
    ) -> dict[str, Any]:
        entry = placement.entry
        python = entry.override("remote_python", self.remote_python)
        if argv and argv[0] in ("python", "python3"):
            argv = [python, *argv[1:]]
        remote_env = {**self.remote_env, **entry.override("remote_env", {})}
        return {
            "argv": argv,
            "env": {**plan.env, **placement.env},
            "env_templates": [*self.kernel_spec.env.items(), *remote_env.items()],
            "resource_files": plan.resource_files,
            "cwd": entry.override("remote_cwd", self.remote_cwd) or None,
            "transport": entry.override("remote_transport", self.remote_transport),
            "kernel_id": str(self.kernel_id),
            "orphan_timeout": self.orphan_timeout,
            "liveness_timeout": self._liveness(entry)[1],
            "attach_token": secrets.token_hex(16),
            "outage_buffer": self.outage_buffer,
            # Streams nobody resumes (the provisioner gave up, or went) end after this.
            "stream_linger": self.reconnect_timeout + self.connect_timeout,
            "ready_timeout": self.launch_timeout,
            "connection": connection,
        }

    def _local_connection_info(self, ports: dict[str, int]) -> KernelConnectionInfo:
        key, scheme, kernel_name = self._session_fields()
        info = {
            "transport": "tcp",
            "ip": "127.0.0.1",
            "shell_port": ports["shell"],
            "iopub_port": ports["iopub"],
            "stdin_port": ports["stdin"],
            "control_port": ports["control"],
            "hb_port": ports["hb"],
            "key": key,
            "signature_scheme": scheme,
            "kernel_name": kernel_name,
            **(self._curve.connection_fields() if self._curve else {}),
        }
        # jupyter_client carries the key as bytes (Session.key), whatever the TypedDict says
        return cast(KernelConnectionInfo, info)


def _as_bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


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
