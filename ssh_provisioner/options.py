"""What a kernelspec can say to ssh-provisioner: every option with its default and its
help (docs/configuration.md is generated from them), and what they come to for a host.

A host entry may override some of them (``{"host": ..., "remote_python": ...}``):
``connect_options_for`` and ``liveness_for`` merge those in.  The options live apart
from SSHProvisioner so that its lifecycle reads on a screen.
"""

from __future__ import annotations

from typing import Any

from asyncssh.misc import parse_time_interval
from traitlets import Bool, CaselessStrEnum, Dict, Float, Int, List, Unicode, Union
from traitlets.config import LoggingConfigurable

from .host.spec import DEFAULT_OUTAGE_BUFFER, MIN_OUTAGE_BUFFER
from .hosts import HostEntry
from .kbdint import AUTH_COOLDOWN, KBDINT
from .master import MODES as MASTER_MODES
from .master import USE_CONTROL_MASTER
from .sshconfig import ALLOW_UNCHECKED


class ProvisionerOptions(LoggingConfigurable):
    """The kernelspec's ``kernel_provisioner.config``, as traits."""

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
    user_options = Dict(
        config=True,
        help="What a user may choose when starting a kernel, with bounds: a dict from a "
        "name (host, partition, gpus, cpus_per_task, mem, time, account, qos) to {'choices': "
        "[...]} or {'min': .., 'max': ..}, each with an optional 'default' and 'label'. "
        "JupyterLab shows a form; scripts pass start_kernel(user_options={...}) or "
        "KERNEL_SSH_<NAME> variables. A value outside the bounds is refused before "
        "anything starts; restarts keep the choice.",
    )
    kernel_log_level = CaselessStrEnum(
        ["debug", "info", "warning"],
        default_value="debug",
        config=True,
        help="The level at which the kernel's own stderr goes to this server's log, each "
        "line prefixed with the kernel's id and host.",
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
    prespawn = Int(
        0,
        min=0,
        config=True,
        help="Kernels of this kernelspec kept started and idle in a Jupyter Server, each "
        "handed to one start whose environment, choices and folder on the host are the "
        "kernelspec's own (docs/instant-kernels.md). They count in max_kernels. A host "
        "entry's own 'prespawn' keeps kernels on that host. Not with 'slurm'.",
    )
    prespawn_max_idle = Float(
        600.0,
        min=1.0,
        config=True,
        help="Seconds a pre-spawned kernel waits for a start; then it is ended and "
        "replaced by a fresh one.",
    )
    pool_idle_timeout = Float(
        60.0,
        config=True,
        help="Seconds a pooled SSH connection stays open after its last kernel is gone "
        "(warm starts reuse it).",
    )

    forward_ports = Union(
        [CaselessStrEnum(["auto", "off"]), List(Union([Int(), Unicode()]))],
        default_value="auto",
        config=True,
        help="Ports the kernel opens on its host (TensorBoard, a Dask dashboard, "
        "Streamlit...) forwarded to this machine, each on the same port number when it is "
        "free here: `auto` (every one), `off`, or a list of ports and ranges "
        '(`[6006, "8000-8100"]`). The kernel\'s own channels are never forwarded again.',
    )
    forward_bind = Unicode(
        "127.0.0.1",
        config=True,
        help="The address of this machine the forwarded ports listen on. Anything but a "
        "loopback address lets other machines reach the kernel's dashboards.",
    )

    remote_kernel = Unicode(
        "",
        config=True,
        help="Run the host's own kernelspec NAME (its argv and env, read on the host at "
        "each start, so a change there needs no reinstall) instead of this kernelspec's "
        "argv. `ssh-provisioner discover HOST` lists what a host has.",
    )
    discover_paths = List(
        Unicode(),
        config=True,
        help="Folders on the host whose subfolders are environments, beyond the usual "
        "places (conda's, ~/.venvs, ~/.virtualenvs, pyenv's): where `discover` and "
        "remote_kernel look too.",
    )
    path_map = List(
        Dict(),
        config=True,
        help='Folders that are the same on both sides: [{"local": "/home/me/projects", '
        '"remote": "/scratch/me/projects"}] (also per host entry). A notebook in a mapped '
        "folder gets its kernel in the mapped folder on the host, if it is there (else "
        "remote_cwd or the home, and the log says why), and a path the kernel reports "
        "there resolves to this machine's (resolvePath). Nothing is copied.",
    )

    def with_defaults(self, entry: HostEntry) -> HostEntry:
        if entry.max_kernels is None and self.max_kernels > 0:
            return HostEntry(entry.host, self.max_kernels, entry.labels, entry.overrides)
        return entry

    def connect_options_for(self, entry: HostEntry) -> dict[str, Any]:
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

    def liveness_for(self, entry: HostEntry) -> tuple[float, float]:
        """(ping interval, the launcher's liveness_timeout): the SSH keepalive's pace, so
        the launcher notices a cut link about when we do.  (0, 0): no keepalives, none."""
        options = self.connect_options_for(entry)
        value = options.get("keepalive_interval") or 0
        # asyncssh takes seconds or OpenSSH's time format ("1m30s")
        interval = parse_time_interval(value) if isinstance(value, str) else float(value)
        if interval <= 0:
            return 0.0, 0.0
        return interval, interval * (int(options.get("keepalive_count_max") or 3) + 1)
