"""Kernels as Slurm jobs, reached through a login node.

A kernel's job is submitted with ``sbatch --parsable`` over the login node's pooled
connection: its script (on stdin) only holds the allocation.  The kernel runs in a
*step* of that job: ``srun --jobid J --overlap`` starts the launcher on the compute
node, with the spec (session key, token) on srun's stdin, never in the script, the
job's environment or a command line.  A restart is a new step in the same job, so it
never queues again; shutdown is ``scancel``.

The launcher's relay listens on the node's cluster address; the login node forwards
the kernel's channels (and the launcher's supervision) to it, and the relay admits only
a client that proves it knows the kernel's token.  Once supervised over the relay the
launcher lets go of srun's stdio, and the login node's wrapper ends ``srun``: no
session stays open on the login node for the kernel's life (an OpenSSH master's
sessions are scarce), and the step lives on without srun.

Why this module is a little over 500 lines: it is Slurm's vocabulary in one place (the
settings and their checks, the job script, the step command, job states, one job's
commands); a kernel's custody of its job is custody.py's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import difflib
import logging
import re
import shlex
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import asyncssh

from .errors import ProvisionerConfigError, SlurmError
from .host.supervisor import PROLOGUE_CWD
from .link import CommandResult, SSHLink
from .payload import BOOTSTRAP
from .status import QUEUED, STARTING, board

log = logging.getLogger(__name__)

COMMAND_TIMEOUT = 30.0  # one Slurm client command (its own MessageTimeout is 10 s)
CANCEL_WAIT = 20.0  # after scancel: until the job has left the queue
PENDING_LOG_EVERY = 60.0  # the pending line again, even with the same reason
UNANSWERED_LIMIT = 120.0  # a start gives up once Slurm has not answered for this long
RELEASED = '{"event": "released"}'  # the launcher's word that srun may go
JOB_ENDED_STATUS = 255  # a kernel whose job (or step) ended: no exit status of its own
# srun ($s) and its children (the shepherd), by /proc: no procps needed on the login node
KILL_SRUN = (
    'for f in /proc/[0-9]*/stat; do read -r p _ _ pp _ < "$f" 2>/dev/null && '
    '[ "$pp" = "$s" ] && kill -KILL "$p"; done; kill -KILL $s'
)
# Runs the prologue (argument 1) as a script, with its newlines, in the shell that then
# becomes the launcher: its exports, `module load`s and a `cd` are the kernel's (the
# launcher starts the kernel there unless remote_cwd says otherwise).  Its output goes
# to stderr: stdout is the event channel.
PROLOGUE_RUNNER = (
    f'p=$(printf "%b" "$1"); shift; {{ eval "$p"; }} >&2; export {PROLOGUE_CWD}="$PWD"; exec "$@"'
)

# Slurm's job states, grouped by what they mean for a kernel.
WAITING_STATES = frozenset({"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "RESIZING"})
RUNNING_STATES = frozenset({"RUNNING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT"})
IN_QUEUE_STATES = WAITING_STATES | RUNNING_STATES | {"COMPLETING"}
UNKNOWN = "UNKNOWN"  # Slurm did not answer: never read as "gone"
GONE = "GONE"  # Slurm no longer knows the job (purged after MinJobAge)

# What Slurm's client commands print when the controller cannot answer right now.
_TRANSIENT = re.compile(
    r"timed out|Unable to contact slurm controller|Connection refused|"
    r"Zero Bytes were transmitted|Slurm backup controller in standby|Resource temporarily",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class SlurmSettings:
    """The ``slurm`` section of the provisioner's config.  Names follow what users
    know from batchspawner and dask-jobqueue."""

    partition: str | None = None
    gpus: str | None = None  # a count, or TYPE:COUNT ("a100:2")
    cpus_per_task: int | None = None
    mem: str | None = None
    time: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    reservation: str | None = None
    job_name: str = "jupyter-{kernel_id}"
    extra_directives: tuple[str, ...] = ()
    prologue: tuple[str, ...] = ()
    queue_timeout: float = 0.0  # 0: wait in the queue as long as it takes
    warn_before_walltime: float = 300.0
    poll_interval: float = 5.0
    empty_job_timeout: float = 120.0  # 0: the job waits for scancel or its time limit

    @classmethod
    def parse(cls, config: Mapping[str, Any]) -> SlurmSettings:
        """From the config dict; an unknown key is an error with a "did you mean"."""
        if not isinstance(config, Mapping):
            raise ProvisionerConfigError(f"slurm: expected a dict of options, not {config!r}")
        known = list(cls.__dataclass_fields__)
        unknown = sorted(set(config) - set(known))
        if unknown:
            hints = []
            for name in unknown:
                close = difflib.get_close_matches(name, known, n=1)
                hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ProvisionerConfigError(
                f"unknown slurm option(s) {', '.join(hints)}; valid: {', '.join(known)}"
            )
        values: dict[str, Any] = {}
        for name, value in config.items():
            if value is None:
                continue
            try:
                values[name] = _coerce(name, value)
            except (TypeError, ValueError) as exc:
                raise ProvisionerConfigError(f"slurm option {name!r}: {exc}") from None
        settings = cls(**values)
        try:
            settings.job_name.format(kernel_id="k")
        except (KeyError, IndexError, ValueError) as exc:
            raise ProvisionerConfigError(
                f"slurm option 'job_name': {settings.job_name!r} may use only {{kernel_id}} ({exc})"
            ) from None
        return settings

    def with_choices(self, chosen: Mapping[str, Any]) -> SlurmSettings:
        """These settings with a user's checked choices (choices.py) in place."""
        values = {name: _coerce(name, value) for name, value in chosen.items()}
        return dataclasses.replace(self, **values)

    def facts(self, job_id: str, login: str) -> dict[str, Any]:
        """For the status board: what was asked of Slurm."""
        facts: dict[str, Any] = {"job_id": job_id, "login": login}
        facts["partition"] = self.partition or ""
        facts["gpus"], facts["time"] = self.gpus or "", self.time or ""
        facts["warn_before_walltime"] = self.warn_before_walltime
        return facts

    def sbatch_argv(self, kernel_id: str) -> list[str]:
        """sbatch's options: all on the command line (no secret is among them), so the
        script Slurm stores is the same few lines for every kernel."""
        argv = ["sbatch", "--parsable", "--no-requeue", "--output=/dev/null"]
        argv.append(f"--job-name={self.job_name.format(kernel_id=kernel_id)}")
        options = {
            "partition": self.partition,
            "cpus-per-task": self.cpus_per_task,
            "mem": self.mem,
            "time": self.time,
            "account": self.account,
            "qos": self.qos,
            "constraint": self.constraint,
            "reservation": self.reservation,
        }
        argv += [f"--{name}={value}" for name, value in options.items() if value is not None]
        if self.gpus is not None:
            argv.append(f"--gres=gpu:{self.gpus}")
        for directive in self.extra_directives:
            argv += shlex.split(directive.removeprefix("#SBATCH").strip())
        return argv

    @property
    def prologue_arg(self) -> str:
        """The prologue as one line (a login shell, csh say, runs the command line first,
        and a newline in it would end it there): its lines joined with escaped newlines,
        which ``PROLOGUE_RUNNER`` turns back into the script as written."""
        script = "\n".join(self.prologue)
        return script.replace("\\", "\\\\").replace("\n", "\\n")

    def step_command(self, job_id: str, python: str, spare_wait: float) -> str:
        """The login node's command that runs the launcher in a new step of the job.

        ``srun`` carries the launcher's stdio until the launcher says it is supervised
        over its relay (RELEASED); then the wrapper ends srun and exits, which ends the
        SSH session.  srun's shepherd (its child) cancels the step when srun dies, so it
        goes first; both by SIGKILL, which neither can act on.
        Output goes through two private FIFOs, so stdout carries only the launcher's
        events and the kernel's own output stays on stderr."""
        launcher = [python, "-I", "-S", "-c", BOOTSTRAP, f"{spare_wait:g}"]
        if self.prologue:
            task = ["bash", "-c", PROLOGUE_RUNNER, "sshp-prologue", self.prologue_arg, *launcher]
        else:
            task = launcher
        srun = ["srun", f"--jobid={job_id}", "--overlap", "--ntasks=1", "--nodes=1", "--quiet"]
        if self.cpus_per_task is not None:
            srun.append(f"--cpus-per-task={self.cpus_per_task}")
        srun += ["--", *task]
        script = (
            "trap '' PIPE; exec 3<&0; d=$(mktemp -d) || exit 1; "
            'mkfifo -m 600 "$d/o" "$d/e" || exit 1; '
            f'{shlex.join(srun)} <&3 >"$d/o" 2>"$d/e" & s=$!; exec 3<&-; '
            'cat "$d/e" >&2 & '
            'while IFS= read -r line; do case "$line" in '
            f"{shlex.quote(RELEASED)}) {KILL_SRUN}; "
            'rm -rf "$d"; exit 0;; esac; '
            'printf \'%s\\n\' "$line"; done <"$d/o"; '
            'wait $s; status=$?; rm -rf "$d"; exit $status'
        )
        return "exec " + shlex.join(["/bin/sh", "-c", script])


def _coerce(name: str, value: Any) -> Any:
    if name in ("extra_directives", "prologue"):
        if isinstance(value, str):
            return (value,)
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise TypeError("expected a list of strings")
        return tuple(value)
    if name == "cpus_per_task":
        if isinstance(value, bool) or int(value) < 1:
            raise ValueError("expected a positive integer")
        return int(value)
    if name == "gpus":
        text = str(value).strip()
        if isinstance(value, bool) or not re.fullmatch(r"([\w.-]+:)?\d+", text):
            raise ValueError(f"expected a GPU count or TYPE:COUNT, not {value!r}")
        return text
    if name in ("queue_timeout", "warn_before_walltime", "poll_interval", "empty_job_timeout"):
        number = float(value)
        if number < 0 or (name == "poll_interval" and number <= 0):
            raise ValueError("expected a positive number of seconds")
        return number
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise TypeError(f"expected a string, not {value!r}")
    return str(value)


def parse_duration(text: str) -> float | None:
    """Slurm's [D-]HH:MM:SS, MM:SS or MM as seconds; None for UNLIMITED and the like."""
    text = text.strip()
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not match:
        return None
    days, first, second, third = match.groups()
    if third is not None:  # H:M:S
        hours, minutes, seconds = int(first), int(second), int(third)
    elif second is not None:  # M:S, or D-H:M
        hours, minutes, seconds = (
            (int(first), int(second), 0) if days else (0, int(first), int(second))
        )
    else:  # M, or D-H
        hours, minutes, seconds = (int(first), 0, 0) if days else (0, int(first), 0)
    return float((int(days or 0) * 24 + hours) * 3600 + minutes * 60 + seconds)


@dataclass(frozen=True)
class JobInfo:
    """What Slurm says of a job: its state (or UNKNOWN / GONE), and why."""

    state: str
    reason: str = ""
    nodes: str = ""
    time_left: float | None = None  # seconds, None if unlimited or not running
    detail: str = ""  # for UNKNOWN: what the command said
    expected_start: str = ""  # while waiting: Slurm's estimate (its local time), if any
    partition: str = ""

    @property
    def waiting(self) -> bool:
        return self.state in WAITING_STATES

    @property
    def running(self) -> bool:
        return self.state in RUNNING_STATES

    @property
    def ended(self) -> bool:
        """Over for good: neither waiting, running nor unknown."""
        return not (self.waiting or self.running or self.state == UNKNOWN)

    def describe(self) -> str:
        reason = f" ({self.reason})" if self.reason and self.reason != "None" else ""
        return f"{self.state}{reason}"

    @classmethod
    def from_scontrol(cls, output: str) -> JobInfo:
        fields = dict(re.findall(r"(\w+)=(\S*)", output))
        state = fields.get("JobState", UNKNOWN)
        time_left = None
        limit = parse_duration(fields.get("TimeLimit", ""))
        ran = parse_duration(fields.get("RunTime", ""))
        if state in RUNNING_STATES and limit is not None and ran is not None:
            time_left = max(0.0, limit - ran)
        nodes = fields.get("NodeList", "")
        start = fields.get("StartTime", "")
        expected = start if state in WAITING_STATES and start[:1].isdigit() else ""
        return cls(
            state,
            fields.get("Reason", ""),
            "" if nodes == "(null)" else nodes,
            time_left,
            expected_start=expected,
            partition=fields.get("Partition", ""),
        )

    def facts(self) -> dict[str, Any]:
        """For the status board: the job as the user sees it."""
        facts: dict[str, Any] = {"state": self.state, "reason": self.reason}
        facts["expected_start"] = self.expected_start
        if self.nodes:
            facts["node"] = self.nodes
        if self.partition:
            facts["partition"] = self.partition
        if self.time_left is not None:
            # to 10 s: the estimate moves with each look, the page need not
            facts["walltime_ends"] = round((time.time() + self.time_left) / 10) * 10
        return facts


async def run_command(
    link: SSHLink, argv: list[str], stdin: bytes | None = None, timeout: float = COMMAND_TIMEOUT
) -> CommandResult:
    """``argv`` on the login node, with ``stdin`` (the job script) if given."""

    async def run() -> CommandResult:
        process = await link.start_process(shlex.join(argv))
        try:
            if stdin:
                process.stdin.write(stdin)
            process.stdin.write_eof()
            out, err = await asyncio.gather(process.stdout.read(), process.stderr.read())
            await process.wait_closed()
        finally:
            process.close()
        return CommandResult(
            process.exit_status, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
        )

    return await asyncio.wait_for(run(), timeout)


def job_script(empty_job_timeout: float) -> str:
    """The job's script: it holds the allocation while the kernel runs in a step of it.

    It ends the job itself once no step has run at two checks in a row, this many
    seconds apart: a job whose server went away before its kernel started (or after
    its kernel ended) is not kept until its time limit.  A failed check counts for
    nothing.  ``sleep`` runs in the background and the trap ends it, so no process of
    the script outlives a scancel (proctrack/linuxproc loses a reparented child)."""
    header = (
        "#!/bin/sh\n"
        "# ssh-provisioner holds this allocation; the kernel runs in a step of it "
        "(srun --overlap).\n"
    )
    if empty_job_timeout <= 0:
        return header + "exec sleep 2147483647\n"
    return header + (
        f"# The job ends once no step has run at two checks, {empty_job_timeout:g} s apart.\n"
        "trap 'kill \"$pid\" 2>/dev/null; exit 143' HUP INT TERM\n"
        "empty=0\n"
        "while :; do\n"
        f"  sleep {empty_job_timeout:g} & pid=$!\n"
        '  wait "$pid"\n'
        '  steps=$(squeue -h -s -j "$SLURM_JOB_ID" -o %i) || continue\n'
        "  if printf '%s\\n' \"$steps\" | grep -q -v -e '[.]batch$' -e '[.]extern$' -e '^$'; then\n"
        "    empty=0\n"
        "  else\n"
        "    empty=$((empty + 1))\n"
        '    [ "$empty" -lt 2 ] || exit 0\n'
        "  fi\n"
        "done\n"
    )


class SlurmJob:
    """One kernel's job, from submission to scancel; shared by the kernel's restarts."""

    def __init__(self, job_id: str, settings: SlurmSettings, *, kernel_id: str, login: str):
        self.job_id = job_id
        self.settings = settings
        self.kernel_id = kernel_id
        self.login = login  # the login node it was submitted through, for messages
        self.last = JobInfo(UNKNOWN)
        self.node_address = ""
        self.cancelled = False
        self.queue_wait: float | None = None  # seconds from the first look to RUNNING

    def __repr__(self) -> str:
        return f"<SlurmJob {self.job_id} {self.last.describe()}>"

    @classmethod
    async def submit(
        cls, link: SSHLink, settings: SlurmSettings, *, kernel_id: str, login: str
    ) -> SlurmJob:
        argv = settings.sbatch_argv(kernel_id)
        try:
            script = job_script(settings.empty_job_timeout)
            result = await run_command(link, argv, script.encode())
        except (asyncssh.Error, OSError, TimeoutError) as exc:
            raise SlurmError(
                f"kernel {kernel_id}: sbatch on {login} failed: {exc}", host=login
            ) from exc
        job_id = result.stdout.strip().split(";")[0]
        if result.exit_status != 0 or not job_id.isdigit():
            said = (result.stderr.strip() or result.stdout.strip())[-800:] or "(no output)"
            if result.exit_status == 127:
                said = f"sbatch is not installed there ({said})"
            raise SlurmError(
                f"kernel {kernel_id}: sbatch on {login} refused the job "
                f"(exit status {result.exit_status}): {said}",
                host=login,
            )
        log.info("kernel %s: submitted Slurm job %s through %s", kernel_id, job_id, login)
        board.post(kernel_id, phase=QUEUED, slurm=settings.facts(job_id, login))
        return cls(job_id, settings, kernel_id=kernel_id, login=login)

    async def query(self, link: SSHLink) -> JobInfo:
        """The job's state now.  A controller that does not answer is UNKNOWN (and
        logged), never "gone": batchspawner#179 cancelled live jobs that way."""
        argv = ["scontrol", "-o", "show", "job", self.job_id]
        try:
            result = await run_command(link, argv)
        except (asyncssh.Error, OSError, TimeoutError) as exc:
            info = JobInfo(UNKNOWN, detail=f"{type(exc).__name__}: {exc}")
        else:
            said = (result.stderr.strip() or result.stdout.strip())[-300:]
            if result.exit_status == 0 and "JobState=" in result.stdout:
                info = JobInfo.from_scontrol(result.stdout)
            elif "Invalid job id" in said and not _TRANSIENT.search(said):
                info = JobInfo(GONE, detail=said)
            else:
                info = JobInfo(UNKNOWN, detail=said or f"exit status {result.exit_status}")
        if info.state == UNKNOWN:
            log.warning(
                "kernel %s: Slurm did not say how job %s is (%s); keeping the kernel, asking "
                "again", self.kernel_id, self.job_id, info.detail,
            )  # fmt: skip
        else:
            self.last = info
            board.post(self.kernel_id, slurm=info.facts())
        return info

    async def wait_running(self, link: SSHLink, *, timeout: float) -> JobInfo:
        """Until the job runs; logs its pending reason as it changes.  ``timeout`` (0:
        none) bounds the queue wait: past it the job is cancelled, a SlurmError."""
        loop = asyncio.get_running_loop()
        started = known_at = loop.time()
        logged: tuple[str, float] | None = None
        delay = 0.2
        while True:
            info = await self.query(link)
            if info.waiting:  # a start counts as queued (metrics) past a moment's wait
                kind = {"start_kind": "queued"} if loop.time() - started >= 1 else {}
                board.post(self.kernel_id, phase=QUEUED, **kind)
            else:
                board.post(self.kernel_id, phase=STARTING)
            if info.running:
                waited = self.queue_wait = loop.time() - started
                if waited >= 1:
                    log.info(
                        "kernel %s: Slurm job %s runs on %s after %.1fs in the queue",
                        self.kernel_id, self.job_id, info.nodes, waited,
                    )  # fmt: skip
                return info
            if info.ended:
                raise SlurmError(
                    f"kernel {self.kernel_id}: Slurm job {self.job_id} ended before the kernel "
                    f"started: {info.describe()}",
                    host=self.login,
                    job_id=self.job_id,
                )
            now = loop.time()
            if info.state != UNKNOWN:
                known_at = now
            elif now - known_at > UNANSWERED_LIMIT:
                raise SlurmError(
                    f"kernel {self.kernel_id}: Slurm on {self.login} has not said how job "
                    f"{self.job_id} is for {UNANSWERED_LIMIT:g}s ({info.detail}); not starting",
                    host=self.login,
                    job_id=self.job_id,
                )
            if info.waiting and (
                logged is None or logged[0] != info.reason or now - logged[1] > PENDING_LOG_EVERY
            ):
                log.info(
                    "kernel %s: starting; Slurm job %s is %s (reason: %s), waited %.0fs",
                    self.kernel_id, self.job_id, info.state, info.reason or "none", now - started,
                )  # fmt: skip
                logged = (info.reason, now)
            if timeout and now - started >= timeout:
                await self.cancel(link)
                raise SlurmError(
                    f"kernel {self.kernel_id}: Slurm job {self.job_id} still "
                    f"{info.describe()} after {timeout:g}s in the queue (queue_timeout); "
                    f"cancelled it",
                    host=self.login,
                    job_id=self.job_id,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 2.0)

    async def address_of(self, link: SSHLink, node: str) -> str:
        """The node's address as Slurm knows it (NodeAddr): where the login node
        reaches the kernel's relay."""
        argv = ["scontrol", "-o", "show", "node", node]
        try:
            result = await run_command(link, argv)
        except (asyncssh.Error, OSError, TimeoutError) as exc:
            raise SlurmError(
                f"kernel {self.kernel_id}: scontrol show node {node} on {self.login}: {exc}",
                host=self.login,
                job_id=self.job_id,
            ) from exc
        match = re.search(r"\bNodeAddr=(\S+)", result.stdout)
        self.node_address = match.group(1) if match else node
        return self.node_address

    async def cancel(self, link: SSHLink) -> bool:
        """scancel, then until the job has left the queue (bounded).  False if scancel
        could not be run over ``link`` (the connection failed): try again later."""
        if self.last.ended:
            return True  # ended already (scancel from outside, walltime)
        self.cancelled = True
        try:
            result = await run_command(link, ["scancel", self.job_id])
        except (asyncssh.Error, OSError, TimeoutError) as exc:
            log.warning("kernel %s: scancel %s failed: %s", self.kernel_id, self.job_id, exc)
            return False
        if result.exit_status != 0:
            log.warning(
                "kernel %s: scancel %s: %s", self.kernel_id, self.job_id, result.stderr.strip()
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CANCEL_WAIT
        while loop.time() < deadline:
            try:
                result = await run_command(link, ["squeue", "-h", "-j", self.job_id, "-o", "%T"])
            except (asyncssh.Error, OSError, TimeoutError):
                break
            state = result.stdout.strip()
            if result.exit_status == 0 and state not in IN_QUEUE_STATES:
                log.info("kernel %s: Slurm job %s cancelled", self.kernel_id, self.job_id)
                return True
            if result.exit_status != 0 and "Invalid job id" in result.stderr:
                return True
            await asyncio.sleep(0.25)
        log.warning(
            "kernel %s: Slurm job %s still in the queue %gs after scancel",
            self.kernel_id, self.job_id, CANCEL_WAIT,
        )  # fmt: skip
        return True

    def walltime_notice(self, time_left: float | None) -> dict[str, Any] | None:
        """For the launcher: when to show the user the time-limit warning, and what."""
        warn = self.settings.warn_before_walltime
        if time_left is None or warn <= 0:
            return None
        minutes = max(1, round(min(warn, time_left) / 60))
        text = (
            f"\n[ssh-provisioner] This kernel's Slurm job {self.job_id} reaches its time "
            f"limit in about {minutes} min; the kernel ends then. Save your work.\n"
        )
        return {"after": max(0.0, time_left - warn), "text": text}
