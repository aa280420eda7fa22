"""SSHProvisioner: glue between jupyter_client's lifecycle hooks and the remote kernel's
seat (the options it takes are options.py's)."""

from __future__ import annotations

import asyncio
import dataclasses
import difflib
import logging
import posixpath
import signal
import time
from typing import Any

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase
from traitlets import TraitError

from . import instant, prespawn
from .choices import SLURM_CHOOSABLE, UserOptions, from_env
from .connect import check_connect_options
from .encryption import negotiate
from .engine import get_engine
from .errors import (
    KernelUnreachable,
    LaunchError,
    ProvisionerConfigError,
    SessionLimitError,
    SSHConnectError,
)
from .forwards import ForwardSettings, jupyter_proxy_base
from .handshake import Handshake
from .hosts import HostEntry
from .kbdint import parse_rules
from .kernel_keys import KernelKeys
from .launch_plan import LaunchPlan, launch_spec, mapped_cwd, path_map_for, plan_launch
from .master import USE_CONTROL_MASTER, mode_of
from .options import ProvisionerOptions
from .paths import PathMap
from .placement import PlacementRequest, Tries, candidates
from .policies import HostPolicy, Placement, load_policy
from .pool import Lease
from .prespawn import Ready
from .probe import run_probe
from .seat import KernelSeat
from .session import KernelSession
from .settings import SessionSettings
from .slurm import SlurmJob, SlurmSettings
from .status import ENDED, FAILED, RUNNING, STARTING, board

_BASE_INIT_ARGS = frozenset({"kernel_id", "kernel_spec", "parent", "config", "log"})


# KernelProvisionerMeta is built at run time from ABCMeta and traitlets' MetaHasTraits:
# mypy cannot see that it derives from the latter.
class SSHProvisioner(KernelProvisionerBase, ProvisionerOptions):  # type: ignore[metaclass]
    """Runs the kernel on a remote host over SSH, as if it were local.

    Why a class of this size: it is jupyter_client's hooks, one method each (pre_launch,
    launch_kernel, poll, wait, send_signal, kill, terminate, cleanup, the provisioner
    info, resolve_path), each handing its work to the seat; its options are options.py's,
    the launch's plan launch_plan.py's, its keys kernel_keys.py's."""

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
            self._entries = [self.with_defaults(HostEntry.parse(item)) for item in self.hosts]
            self._policy: HostPolicy = load_policy(self.policy)
            allow = self.allow_unchecked_host_keys
            parse_rules(self.kbdint)
            for entry in self._entries:
                parse_rules(entry.override("kbdint", []))
                mode_of({USE_CONTROL_MASTER: entry.override("use_control_master", None)})
            self._slurm = SlurmSettings.parse(self.slurm) if self.slurm else None
            self._declared_slurm = self._slurm  # the user's choices go on top, per start
            self._user_options = UserOptions.parse(
                self.user_options, [entry.name for entry in self._entries]
            )
            slurm_choices = {o.name for o in self._user_options.options} - {"host"}
            if slurm_choices and self._slurm is None:
                raise ProvisionerConfigError(
                    f"user_options {', '.join(sorted(slurm_choices))}: Slurm's, and there "
                    "is no 'slurm' section"
                )
            self._forwards = ForwardSettings.parse(
                self.forward_ports, self.forward_bind, jupyter_proxy_base(self.parent)
            )
            PathMap.parse(self.path_map)
            for entry in self._entries:
                PathMap.parse(entry.override("path_map", []))
            check_connect_options(self.connect_options, allow_unchecked=allow)
            for entry in self._entries:
                check_connect_options(entry.override("connect_options", {}), allow_unchecked=allow)
            if self._slurm is not None and instant.targets_of(self):
                raise ProvisionerConfigError(
                    "prespawn: not with 'slurm' (each kernel waiting would hold a job's "
                    "allocation; docs/instant-kernels.md)"
                )
        except ProvisionerConfigError as exc:
            raise ProvisionerConfigError(f"{where}: {exc}") from exc
        self._plan: LaunchPlan | None = None
        self.choices: dict[str, Any] = {}  # the user's, checked (choices.py)
        self._starting: asyncio.Task[KernelSession] | None = None  # the engine's
        self._start_stopped = False  # stop_start() was called
        self.seat = KernelSeat(str(self.kernel_id))  # what outlives restarts (see seat)
        self.keys = KernelKeys(self.parent)

    # -- host selection ----------------------------------------------------------------

    def _hosts_for(self, pinned: str | None, labels: frozenset[str]) -> list[HostEntry]:
        def parse(name: str) -> HostEntry:
            return self.with_defaults(HostEntry.parse(name))

        return candidates(
            self._entries, pinned, labels, allow_any_host=self.allow_any_host, parse=parse
        )

    async def _probe(self, entry: HostEntry, command: str) -> str | None:
        """Run a policy's probe on ``entry`` over its pooled connection (engine loop)."""
        host = entry.host

        async def probe(lease: Lease) -> str | None:
            return await run_probe(lease.connection, host, command, self.connect_timeout)

        try:
            _, output = await get_engine().pool.use(
                host,
                self.connect_options_for(entry),
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
        local_cwd = kwargs.pop("cwd", None)  # on *this* machine: path_map maps it
        self.keys.curve = negotiate(
            self.parent, kwargs.pop("transport_encryption", None), self.kernel_spec.display_name
        )
        argv = list(self.kernel_spec.argv) + extra_arguments
        if not argv and not self.remote_kernel:  # (the host's kernelspec has one)
            raise ProvisionerConfigError(
                f"kernelspec {self.kernel_spec.display_name!r}: empty argv"
            )
        where = f"kernelspec {self.kernel_spec.display_name!r}"
        chosen = from_env(request_env, self._user_options)
        chosen.update(kwargs.pop("user_options", None) or {})
        self.choices = self._user_options.resolve(chosen, where)
        if self._declared_slurm is not None:
            slurm = {k: v for k, v in self.choices.items() if k in SLURM_CHOOSABLE}
            self._slurm = self._declared_slurm.with_choices(slurm)
        plan = await plan_launch(
            self.kernel_spec, request_env, argv, self.forward_env, local_cwd or None
        )
        if "host" in self.choices:
            plan = dataclasses.replace(plan, pinned_host=self.choices["host"])
        self._plan = plan
        board.post(
            str(self.kernel_id),
            kernelspec=getattr(self.parent, "kernel_name", ""),
            display_name=self.kernel_spec.display_name,
            phase=STARTING,
            started=time.time(),
            start_kind="restart" if self.seat.ports is not None else "cold",
            session_path=request_env.get("JPY_SESSION_NAME", ""),  # Jupyter Server's
            choices=self.choices,
            error="",
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
        connection = self.keys.for_host()
        seat = self.seat
        previous = seat.placement.entry if seat.placement and self.restart_same_host else None
        request = PlacementRequest(
            self._hosts_for(plan.pinned_host, plan.labels), self._policy, prefer=previous
        )
        tries = Tries(
            str(self.kernel_id),
            self.max_launch_attempts,
            self.host_cooldown,
            self._probe,
            self.probe_ttl,
        )

        def spec(placement: Placement) -> dict[str, Any]:
            kernel = (str(self.kernel_id), self.kernel_spec)
            return launch_spec(
                self, kernel, dataclasses.replace(plan, argv=cmd), placement, connection
            )

        started = time.perf_counter()
        self._start_stopped = False
        if seat.ports is None and prespawn.enabled() and instant.targets_of(self):
            ready = await get_engine().run(instant.take(self, cmd, plan))
            if ready is not None:
                return await self._hand_over(ready, plan, started)

        async def start() -> KernelSession:
            self._starting = asyncio.current_task()  # (on the engine: see stop_start)
            return await seat.start(request, tries, self._settings, spec)

        starting = get_engine().submit(start())
        try:
            session = await asyncio.wrap_future(starting)
        except asyncio.CancelledError:
            if not starting.cancelled() or not self._start_stopped:
                raise  # the caller's own cancellation
            board.post(str(self.kernel_id), phase=ENDED, error="")
            raise LaunchError(
                f"kernel {self.kernel_id}: its start was stopped (shut down before it ran)",
                host=plan.pinned_host or "",
            ) from None
        except BaseException as exc:
            board.post(str(self.kernel_id), phase=FAILED, error=str(exc) or type(exc).__name__)
            raise
        finally:
            self._starting = None
        handshake = session.handshake
        entry = seat.placement.entry if seat.placement else None
        transport = entry.override("remote_transport", self.remote_transport) if entry else "?"
        board.post(
            str(self.kernel_id),
            phase=RUNNING,
            transport=transport,
            curve=self.keys.curve is not None,
            ready_ms=round((time.perf_counter() - started) * 1000),
        )
        self.log.info(
            "kernel %s on %s (%s): pid %d, %s transport, ready in %.0f ms",
            self.kernel_id,
            entry.name if entry else "?",
            handshake.hostname if handshake else "?",
            handshake.pid if handshake else 0,
            transport,
            (time.perf_counter() - started) * 1000,
        )
        if entry is not None and handshake is not None and plan.local_cwd:
            self._say_where(entry, plan, handshake)
        self.connection_info = self.keys.local_connection_info(session.local_ports)
        return self.connection_info

    async def _hand_over(
        self, ready: Ready, plan: LaunchPlan, started: float
    ) -> KernelConnectionInfo:
        """A pre-spawned kernel is this start's: the manager gets its keys."""
        self.keys.adopt_saved(ready.connection)
        session = self.seat.session
        if session is None:
            raise RuntimeError("a pre-spawned kernel has its session")
        ready_ms = round((time.perf_counter() - started) * 1000)
        board.post(str(self.kernel_id), phase=RUNNING, start_kind="prespawned", ready_ms=ready_ms)
        self.log.info(
            "kernel %s on %s: pre-spawned %.0f s ago, taken in %d ms",
            self.kernel_id, ready.host, time.monotonic() - ready.born, ready_ms,
        )  # fmt: skip
        self.connection_info = self.keys.local_connection_info(session.local_ports)
        name = plan.env.get(prespawn.SESSION_NAME)
        if name and self.kernel_spec.language.lower().startswith("python"):
            info = dict(self.connection_info)
            await get_engine().run(prespawn.tell_session_name(info, name, self.launch_timeout))
        return self.connection_info

    def stop_start(self) -> bool:
        """Stop a start still under way (a Slurm job waiting in the queue): the job is
        cancelled and the start fails at once, rather than when the job runs.  For Jupyter
        Server's pending kernels, whose shutdown otherwise waits for the start to end."""
        starting = self._starting
        if starting is None or starting.done():
            return False
        self._start_stopped = True
        # the engine's task, not our wait for it: its clean-up (scancel) ends first
        get_engine().loop.call_soon_threadsafe(starting.cancel)
        return True

    def _say_where(self, entry: HostEntry, plan: LaunchPlan, handshake: Handshake) -> None:
        """Why the kernel is not in the notebook's folder, when path_map could say."""
        if handshake.cwd_note:
            self.log.warning(
                "kernel %s on %s: %s; started in %s instead",
                self.kernel_id, entry.name, handshake.cwd_note, handshake.cwd,
            )  # fmt: skip
        elif mapped_cwd(self, entry, plan) is None and path_map_for(self, entry).pairs:
            self.log.info(
                "kernel %s on %s: the notebook's folder %s is in no path_map folder; "
                "started in %s",
                self.kernel_id, entry.name, plan.local_cwd, handshake.cwd,
            )  # fmt: skip

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
        try:
            if seat.session is None and (restart or (seat.ports is None and seat.job is None)):
                seat.reaped = True  # nothing to release: no hop to the engine
                return
            release = seat.release(restart, self.connect_options_for, self.pool_idle_timeout)
            await get_engine().run(release)
        finally:
            if not restart:
                board.drop(str(self.kernel_id))

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
            # the ports the kernel opened on its host -> where they are on this machine
            info["forwarded_ports"] = {str(p): q for p, q in session.forwarded_ports.items()}
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
            entry = self._hosts_for(str(host_name), frozenset())[0]
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
        self.keys.adopt_saved(saved_info)
        self.connection_info = self.keys.local_connection_info(session.local_ports)
        self.log.info(
            "kernel %s on %s: reattached (pid %d)", self.kernel_id, entry.name, handshake.pid
        )

    def resolve_path(self, path: str) -> str | None:
        """This machine's path for ``path`` as the kernel means it (relative to its
        working directory on the host, ``~`` its home there), when path_map maps it;
        else None: a path on the host is never presented as one here."""
        handshake = self.seat.last_handshake()
        entry = self.seat.placement.entry if self.seat.placement else None
        if handshake is None or entry is None:
            return None
        if path == "~" or path.startswith("~/"):
            path = handshake.home + path[1:]
        on_host = posixpath.normpath(posixpath.join(handshake.cwd, path))
        return path_map_for(self, entry).to_local(on_host)

    # -- helpers -------------------------------------------------------------------

    def _settings(self, entry: HostEntry, kernel_id: str | None = None) -> SessionSettings:
        return SessionSettings(
            kernel_id=kernel_id or str(self.kernel_id),
            host_name=entry.name,
            host=entry.host,
            connect_options=self.connect_options_for(entry),
            python=entry.override("remote_python", self.remote_python),
            connect_timeout=self.connect_timeout,
            launch_timeout=self.launch_timeout,
            reconnect_timeout=self.reconnect_timeout,
            idle_timeout=self.pool_idle_timeout,
            ping_interval=self.liveness_for(entry)[0],
            prewarm=self.prewarm_launcher and self._slurm is None,  # spares: login node's
            slurm=self._slurm,
            forwards=self._forwards,
            kernel_log_level=logging.getLevelName(self.kernel_log_level.upper()),
        )
