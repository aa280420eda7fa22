"""`ssh-provisioner check`: can each host run kernels, and if not, why not."""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import asyncssh

from .connect import connect
from .errors import (
    AuthenticationError,
    ControlMasterError,
    HostKeyError,
    LaunchError,
    SSHConnectError,
    SSHProvisionerError,
)
from .host.supervisor import KEPT_READY, RUNTIME_DIR_PREFIX
from .hosts import Host, HostEntry
from .link import CommandResult, SSHLink
from .master import locate, mode_of
from .mux import MuxLink
from .mux_control import MasterNotOurs
from .policies import LeastLoad, MostFreeGpuMemory, parse_gpus, parse_load
from .probe import run_probe
from .slurm import SlurmSettings
from .sshconfig import (
    ALLOW_UNCHECKED,
    check_host_key_checking,
    known_hosts_sources,
    resolve_host_config,
    unchecked,
)

CHECKS = (
    "master", "dns", "tcp", "host key", "auth", "python", "kernel", "load", "gpus", "kernels",
    "slurm", "rtt",
)  # fmt: skip
SLURM_COMMANDS = ("sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")
OLDEST_PYTHON = (3, 6)  # the oldest the launcher runs on (tested on 3.6 to 3.13)
OK, FAIL, WARN, SKIP, INFO = "ok", "FAIL", "warn", "skip", "info"
# Each answer is the last line, after a newline of its own: what a login shell prints
# first (a .bashrc's banner, maybe without a newline) comes before it.
PYTHON_VERSION = "import sys; print('\\n%d.%d.%d' % sys.version_info[:3])"
IPYKERNEL_VERSION = "import ipykernel; print('\\n' + ipykernel.__version__)"
WHICH = "import shutil,sys; p=shutil.which(sys.argv[1]); print('\\n'+(p or '')); sys.exit(not p)"
LOAD_PROBE = str(LeastLoad.probe_command)
GPU_PROBE = str(MostFreeGpuMemory.probe_command)
# This login's kernels on the host (their launchers' runtime dirs), and how many of them
# are kept ready for a start to take (prespawn); Python 3.6 and up.
KERNELS_PROBE = f"""
import glob, os, tempfile
mine = ready = 0
for path in glob.glob(os.path.join(tempfile.gettempdir(), {RUNTIME_DIR_PREFIX + "*"!r})):
    try:
        if os.stat(path).st_uid == os.getuid():
            mine += 1
            ready += os.path.exists(os.path.join(path, {KEPT_READY!r}))
    except OSError:
        pass
print("\\n%d %d" % (mine, ready))
"""


@dataclass
class Check:
    status: str
    detail: str = ""
    noted: bool = False  # shown under the table even when all is well


@dataclass
class HostReport:
    host: str
    checks: dict[str, Check] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(check.status == FAIL for check in self.checks.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "ok": self.ok,
            "checks": {
                name: {"status": c.status, "detail": c.detail} for name, c in self.checks.items()
            },
        }


async def check_host(
    entry: HostEntry,
    *,
    connect_options: dict[str, Any],
    python: str,
    kernel_argv: list[str] | None = None,
    timeout: float = 10.0,
    slurm: SlurmSettings | None = None,
    remote_kernel: tuple[str, list[str]] | None = None,
) -> HostReport:
    """Every check for one host; later checks are skipped once an earlier one fails.

    ``kernel_argv`` is the kernelspec's command: ipykernel is checked for a Python
    kernel (and when it is None), the program's presence on the host for any other.
    With ``slurm`` the host is a login node: Slurm's commands, its answer, the
    partition and the GPU request are checked there instead (kernels run elsewhere).
    ``remote_kernel`` (name, search folders): the host's own kernelspec must be there."""
    report = HostReport(entry.name)
    checks = report.checks
    host = entry.host
    port = host.port or 22
    checks["master"], through_master = await _check_master(host, connect_options)
    if checks["master"].status == FAIL:
        return _skip_rest(report)
    if through_master:  # the master reaches the host its own way (ProxyJump, say)
        checks["dns"] = checks["tcp"] = Check(SKIP, "through the OpenSSH master")
    else:
        await _check_network(checks, host, port, timeout)
    if checks["tcp"].status == FAIL:
        return _skip_rest(report)
    return await _check_login(
        report, entry, connect_options, python, kernel_argv, timeout, slurm, remote_kernel
    )


async def _check_master(host: Host, options: dict[str, Any]) -> tuple[Check, bool]:
    """Is there a running OpenSSH master for the host, and will it be used?"""
    mode = mode_of(options)
    if mode == "never":
        return Check(INFO, "not used (use_control_master: never)"), False
    try:
        place = await locate(host, options)
    except ControlMasterError as exc:
        return Check(FAIL if mode == "always" else WARN, str(exc)), False
    if place.control_path is None:
        status = FAIL if mode == "always" else INFO
        return Check(status, "none: the ssh config gives the host no ControlPath"), False
    try:
        link = await MuxLink.open(place.control_path, place.user)
    except MasterNotOurs as exc:
        return Check(FAIL if mode == "always" else WARN, str(exc)), False
    except (OSError, TimeoutError):
        status = FAIL if mode == "always" else INFO
        detail = f"no master running; open one with `{place.open_command}`"
        return Check(status, detail, noted=True), False
    link.close()
    await link.wait_closed()
    return Check(OK, f"uses the OpenSSH master at {place.control_path}", noted=True), True


async def _check_network(checks: dict[str, Check], host: Host, port: int, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    address: str | None = None
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host.hostname, port, type=socket.SOCK_STREAM), timeout
        )
        address = str(infos[0][4][0])
        checks["dns"] = Check(OK, address)
    except (OSError, TimeoutError) as exc:
        # Not fatal yet: it may be a Host alias that ~/.ssh/config maps to a real name.
        checks["dns"] = Check(WARN, f"not resolved here ({exc}); a ~/.ssh/config alias?")
    if address is not None:
        started = time.perf_counter()
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(address, port), timeout)
            rtt = (time.perf_counter() - started) * 1000
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            checks["tcp"] = Check(OK, f"port {port} open")
            checks["rtt"] = Check(INFO, f"{rtt:.1f} ms")
        except ConnectionRefusedError:
            checks["tcp"] = Check(FAIL, f"port {port}: connection refused")
        except OSError as exc:
            checks["tcp"] = Check(FAIL, f"port {port}: {exc.strerror or exc}")
        except TimeoutError:
            checks["tcp"] = Check(FAIL, f"port {port}: timed out")
    checks.setdefault("tcp", Check(SKIP, "not resolved here"))


async def _check_login(
    report: HostReport,
    entry: HostEntry,
    connect_options: dict[str, Any],
    python: str,
    kernel_argv: list[str] | None,
    timeout: float,
    slurm: SlurmSettings | None = None,
    remote_kernel: tuple[str, list[str]] | None = None,
) -> HostReport:
    checks = report.checks
    host = entry.host
    key_check = Check(OK, "known and matching")
    with contextlib.suppress(SSHProvisionerError):  # connect() reports it, below
        config = await resolve_host_config(host, connect_options)
        allow = bool(connect_options.get(ALLOW_UNCHECKED))
        plain = {k: v for k, v in connect_options.items() if k != ALLOW_UNCHECKED}
        checked = check_host_key_checking(host, plain, config, allow_unchecked=allow)
        # what asyncssh is given, after the config's canonical and final passes
        key_check = Check(OK, f"known and matching (in {known_hosts_sources(checked)})", noted=True)
        if unchecked(checked):
            key_check = Check(
                WARN,
                f"NOT checked ({ALLOW_UNCHECKED}): whoever answers as this host gets "
                "the kernels' code",
            )
    try:
        connection = await connect(host, connect_options, connect_timeout=timeout)
    except HostKeyError as exc:
        checks["host key"] = Check(FAIL, str(exc))
        return _skip_rest(report)
    except AuthenticationError as exc:
        checks["host key"] = key_check
        checks["auth"] = Check(FAIL, str(exc))
        return _skip_rest(report)
    except SSHConnectError as exc:
        if checks["dns"].status == WARN:
            checks["dns"] = Check(FAIL, checks["dns"].detail)
        checks["tcp"] = Check(FAIL, str(exc))
        return _skip_rest(report)
    try:
        checks["host key"] = key_check
        checks["auth"] = Check(OK, f"as {connection.username} ({connection.description})")
        if slurm is not None:
            for name in ("python", "kernel", "load", "gpus", "kernels"):
                checks[name] = Check(SKIP, "on the compute nodes")
            checks["slurm"] = await _check_slurm(connection, slurm, timeout)
            return report
        checks["slurm"] = Check(SKIP, "not a Slurm kernelspec")
        version = await _run(connection, [python, "-c", PYTHON_VERSION], timeout)
        if version.exit_status != 0:
            checks["python"] = Check(FAIL, f"{python}: {_why(version)}")
            return _skip_rest(report)
        printed = str(version.stdout).strip().splitlines() or [""]
        found = printed[-1]  # the lines before it are the login shell's own
        if _version_tuple(found) < OLDEST_PYTHON:
            oldest = ".".join(map(str, OLDEST_PYTHON))
            checks["python"] = Check(
                FAIL,
                f"{python} is Python {found}; the launcher needs {oldest} or newer: set "
                f"remote_python (--python) to a newer interpreter on the host",
            )
            return _skip_rest(report)
        checks["python"] = Check(OK, f"{python} {found}")
        if len(printed) > 1:
            checks["python"] = Check(
                WARN,
                f"{python} {found}; the login shell prints to stdout ({printed[0][:60]!r}, "
                f"{len(printed) - 1} line(s)): kernels start (the launcher skips it), but "
                "print only in interactive shells (`[ -t 1 ] && ...`, or .bash_profile)",
            )
        if remote_kernel is not None:
            checks["kernel"] = await _check_remote_kernel(
                connection, host, python, remote_kernel, timeout
            )
        else:
            checks["kernel"] = await _check_kernel(connection, python, kernel_argv, timeout)
        load = parse_load(await run_probe(connection, host, LOAD_PROBE, timeout))
        checks["load"] = Check(INFO, f"{load:.2f} per CPU" if load is not None else "unknown")
        gpus = parse_gpus(await run_probe(connection, host, GPU_PROBE, timeout))
        checks["gpus"] = Check(
            INFO,
            f"{len(gpus)}, most free {max(g.free_mib for g in gpus)} MiB" if gpus else "none",
        )
        checks["kernels"] = await _check_kernels(connection, python, timeout)
    except (asyncssh.Error, OSError, TimeoutError) as exc:
        checks.setdefault("python", Check(FAIL, f"connection failed: {exc}"))
        return _skip_rest(report)
    finally:
        connection.close()
        with contextlib.suppress(Exception):
            await connection.wait_closed()
    return report


async def _check_slurm(connection: SSHLink, slurm: SlurmSettings, timeout: float) -> Check:
    """The login node can submit the kernelspec's jobs: Slurm's client commands are
    there, the controller answers, the partition exists, some node has the GPUs."""
    probe = (
        "for c in "
        + " ".join(SLURM_COMMANDS)
        + '; do command -v "$c" >/dev/null || echo "$c"; done'
    )
    missing = (await asyncio.wait_for(connection.run(probe), timeout)).stdout.split()
    if missing:
        return Check(FAIL, f"Slurm's commands are missing on the login node: {', '.join(missing)}")
    sinfo = await _run(connection, ["sinfo", "-h", "-o", "%P|%a|%D|%G"], timeout)
    if sinfo.exit_status != 0:
        return Check(FAIL, f"sinfo did not answer: {_why(sinfo)}")
    partitions: dict[str, tuple[str, int, list[str]]] = {}
    default = ""
    for line in str(sinfo.stdout).splitlines():
        name, available, count, gres = [*line.split("|"), "", "", ""][:4]
        if name.endswith("*"):
            name = default = name[:-1]
        _, nodes_so_far, resources_so_far = partitions.get(name, ("", 0, []))
        nodes_here = int(count) if count.isdigit() else 0
        partitions[name] = (available, nodes_so_far + nodes_here, [*resources_so_far, gres])
    wanted = slurm.partition or default
    if wanted not in partitions:
        there = ", ".join(sorted(partitions)) or "none"
        return Check(FAIL, f"no partition {wanted or '(default)'!r} (there are: {there})")
    available, node_count, resources = partitions[wanted]
    if available != "up":
        return Check(WARN, f"partition {wanted} is {available}")
    if slurm.gpus is not None:
        kind, _, wanted_gpus = slurm.gpus.rpartition(":")
        most = max((_gpus_in(gres, kind) for gres in resources), default=0)
        if most < int(wanted_gpus):
            return Check(
                FAIL,
                f"no node in partition {wanted} has {wanted_gpus} GPU(s)"
                + (f" of type {kind}" if kind else "")
                + f" (at most {most})",
            )
    return Check(OK, f"partition {wanted}: {node_count} node(s)")


def _gpus_in(gres: str, kind: str) -> int:
    """The GPUs a node's gres string ("gpu:2", "gpu:a100:4(S:0-1),shard:8") offers."""
    most = 0
    for item in gres.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] != "gpu" or len(parts) < 2 or not parts[-1].isdigit():
            continue
        if kind and (len(parts) < 3 or parts[1] != kind):
            continue
        most = max(most, int(parts[-1]))
    return most


def is_ipykernel(argv: list[str] | None) -> bool:
    return any("ipykernel" in arg for arg in argv or ["ipykernel"])


async def _check_kernel(
    connection: SSHLink,
    python: str,
    argv: list[str] | None,
    timeout: float,
) -> Check:
    if not argv or is_ipykernel(argv):
        result = await _run(connection, [python, "-c", IPYKERNEL_VERSION], timeout)
        if result.exit_status == 0:
            return Check(OK, f"ipykernel {_last_line(result)}")
        return Check(FAIL, f"ipykernel not importable by {python}: {_why(result)}")
    program = python if argv[0] in ("python", "python3") else argv[0]
    result = await _run(connection, [python, "-c", WHICH, program], timeout)
    if result.exit_status == 0:
        return Check(OK, f"{program} at {_last_line(result)}")
    return Check(FAIL, f"the kernel's program {program!r} is not on the host's PATH")


async def _check_remote_kernel(
    connection: SSHLink,
    host: Host,
    python: str,
    remote_kernel: tuple[str, list[str]],
    timeout: float,
) -> Check:
    """The host's own kernelspec that ``remote_kernel`` names is there."""
    from .discover import discover_over

    name, search = remote_kernel
    try:
        kernels = await discover_over(connection, host, python, search, timeout)
    except LaunchError as exc:
        return Check(FAIL, str(exc))
    specs = {k["name"]: k for k in kernels if k["kind"] == "kernelspec"}
    found = specs.get(name.lower())
    if found is None:
        has = ", ".join(sorted(specs)) or "none"
        return Check(FAIL, f"no kernelspec {name!r} on the host (remote_kernel); it has: {has}")
    return Check(OK, f"the host's kernelspec {name!r} ({found['language']}, {found['path']})")


async def _check_kernels(connection: SSHLink, python: str, timeout: float) -> Check:
    """How many kernels of this package the login runs there, and how many of them wait,
    kept ready, for a start to take (a Jupyter Server's prespawn)."""
    result = await _run(connection, [python, "-c", KERNELS_PROBE], timeout)
    try:
        running, ready = (int(n) for n in _last_line(result).split())
    except ValueError:
        return Check(INFO, "unknown")
    return Check(INFO, f"{running} running ({ready} kept ready)" if ready else f"{running} running")


def _last_line(result: CommandResult) -> str:
    return (str(result.stdout).strip().splitlines() or [""])[-1]


def _version_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(".")[:2])
    except ValueError:
        return (0,)


def _skip_rest(report: HostReport) -> HostReport:
    for name in CHECKS:
        report.checks.setdefault(name, Check(SKIP))
    return report


async def _run(connection: SSHLink, argv: list[str], timeout: float) -> CommandResult:
    return await asyncio.wait_for(connection.run("exec " + shlex.join(argv)), timeout)


def _why(result: CommandResult) -> str:
    lines = str(result.stderr or "").strip().splitlines()
    return lines[-1] if lines else f"exit status {result.exit_status}"


def render_table(reports: list[HostReport]) -> str:
    headers = ["host", *CHECKS]
    rows = [[r.host, *(_cell(r.checks.get(name, Check(SKIP))) for name in CHECKS)] for r in reports]
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [headers, *rows]
    ]
    problems = [
        f"  {r.host}: {name}: {c.detail}"
        for r in reports
        for name, c in r.checks.items()
        if c.status in (FAIL, WARN) and c.detail
    ]
    notes = [  # how each host is reached (an OpenSSH master), what its key was checked against
        f"  {r.host}: {name}: {c.detail}"
        for r in reports
        for name, c in r.checks.items()
        if c.status in (OK, INFO) and c.noted
    ]
    failed = [r.host for r in reports if not r.ok]
    verdict = (
        f"All {len(reports)} host(s) can run kernels."
        if not failed
        else f"{len(failed)} of {len(reports)} host(s) cannot run kernels: {', '.join(failed)}"
    )
    return "\n".join(
        [
            *lines,
            *(["", "notes:", *notes] if notes else []),
            *(["", "problems:", *problems] if problems else []),
            "",
            verdict,
        ]
    )


def _cell(check: Check) -> str:
    if check.status == INFO:
        return check.detail[:28]
    if check.status == OK and check.detail and len(check.detail) <= 28:
        return check.detail
    return check.status
