"""The launcher's entry: start a kernel on this host and supervise it.

Standard library only, Python >= 3.6 (no newer idiom: ruff lints it for py37, the
tests run it on every interpreter from 3.6 to 3.13): its source travels over the SSH channel
(see ``BOOTSTRAP``), so nothing needs installing on the host but Python and the
kernel.  Protocol, one JSON document per line:

stdin   line 1   the payload (consumed by ``payload.BOOTSTRAP``)
        line 2   the launch spec (see ``spec``)
        then     control lines: ``{"op": "signal", "signum": N}``, ``{"op": "ping"}``,
                 ``{"op": "notice", "text"}`` (a line for the running cell's output),
                 ``{"op": "taken", "kernel_id"}`` (a kernel kept ready was taken)
stdout  ready    ``{"event": "ready", "pid", "pgid", "endpoints", ...}``
        error    ``{"event": "error", "reason", "message", "stderr"}``
        ports    ``{"event": "ports", "ports": {"6006": "127.0.0.1"}}``: the TCP ports
                 the kernel's processes listen on now (with ``watch_ports``)
        exit     ``{"event": "exit", "status": N}``   (Popen convention: -N = signal)

The kernel's own stdout/stderr are relayed to the launcher's stderr.
When the client leaves while the kernel runs, the kernel's process group is killed
after ``orphan_timeout`` seconds unless a client reattaches.  The client has left when
its channel reaches EOF, or when it has sent nothing (it pings) for ``liveness_timeout``
seconds: over a cut link sshd keeps the session open until its TCP keepalive gives up,
hours later, so EOF alone would leave the kernel running that long.
"""

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
from typing import Any, Callable, List, Optional

from .output import emit, log
from .recipe import LaunchFailed
from .spec import LaunchSpec
from .supervisor import Supervisor

NO_SPEC = 2  # exit status of a spare launcher no spec reached in time (remote.py)


def on_terminate(supervisor: Supervisor) -> Any:
    def handler(signum: int, frame: Any) -> None:
        # Once: a second SIGTERM (Slurm sends one per step and per job at a time limit)
        # must not cut short the cleanup the first one started.
        for other in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(other, signal.SIG_IGN)
        supervisor.send(signal.SIGTERM)
        raise SystemExit(128 + signum)

    return handler


def detach() -> Callable[[], None]:
    """Go on in a child process; this one, the SSH session's own, waits until the child
    calls the returned function (a client supervises it over LAUNCHER_CHANNEL now) or
    ends, and exits.  The child then holds none of the session's pipes either, so the
    session ends, and no longer counts against the server's MaxSessions.  (The parent
    must not exit sooner: sshd closes a session's stdin when its process exits.)"""
    read_end, write_end = os.pipe()
    if os.fork() > 0:
        os.close(write_end)
        with contextlib.suppress(OSError):
            os.read(read_end, 1)  # returns once the child closed its end, or died
        os._exit(0)
    os.close(read_end)
    released: List[bool] = []

    def release() -> None:
        if not released:
            released.append(True)
            # Let go of the session's pipes too: sshd ends a session once its process
            # has exited and its output is at EOF, whatever the client does.
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            os.close(devnull)
            os.close(write_end)

    return release


def release_in_place() -> None:
    """Let go of the channel this launcher was started over, and stay: a Slurm step
    ends when its task does.  The login node's wrapper ends ``srun`` on the marker, so
    the SSH session ends too; the step lives on without it."""
    with contextlib.suppress(OSError):
        os.write(1, b'{"event": "released"}\n')
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def cancel_own_job() -> None:
    """The kernel was an orphan: give its Slurm allocation back too."""
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        log("orphaned: cancelling Slurm job %s" % job)
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.call(["scancel", job], timeout=30)  # noqa: S607 (the job's PATH)


def read_spec_line(wait: Optional[float]) -> str:
    """The spec, or "" if none came within ``wait`` seconds (a spare nobody used) or
    stdin closed.  A thread reads it: stdin may already hold it in its buffer."""
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(sys.stdin.readline()), daemon=True).start()
    try:
        return lines.get(timeout=wait)
    except queue.Empty:
        return ""


def main() -> int:
    line = read_spec_line(float(sys.argv[1]) if len(sys.argv) > 1 else None)
    if not line:
        return NO_SPEC
    spec = LaunchSpec.from_line(line)
    supervisor = Supervisor(spec)
    if spec.detach == "in_place":
        supervisor.release_session = release_in_place
    elif spec.detach:
        supervisor.release_session = detach()
    # Interrupts sent to the launcher (an SSH `signal` request, for instance) go to the
    # kernel; Python resets handled signals to SIG_DFL in the child, which is exactly
    # what a kernel needs (a non-interactive shell's background jobs ignore SIGINT).
    for signum in (signal.SIGINT, signal.SIGQUIT):
        signal.signal(signum, lambda s, f: supervisor.send(s))
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_terminate(supervisor))
    threading.Thread(target=supervisor.read_control, daemon=True).start()
    status = 1
    try:
        try:
            emit(supervisor.start(early=emit))
        except LaunchFailed as exc:
            supervisor.stop_kernel()
            emit(
                {
                    "event": "error",
                    "reason": exc.reason,
                    "message": exc.message,
                    "stderr": exc.stderr,
                    "status": exc.status,
                }
            )
            return 3
        status = supervisor.supervise()
        supervisor.cleanup()
        emit({"event": "exit", "status": status})
        supervisor.deliver_last_words()
    finally:
        supervisor.cleanup()
        if supervisor.orphaned and spec.cancel_job_when_orphaned:
            cancel_own_job()
    return status if status >= 0 else 128 - status
