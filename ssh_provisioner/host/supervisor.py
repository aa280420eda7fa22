"""The Supervisor: starts the kernel, audits its ports, and supervises it to its end."""

import collections
import contextlib
import errno
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Set

from .orphan import OrphanClock
from .output import CLIENT, emit, log
from .ports import PortWatch, reachable_at
from .process import (
    become_subreaper,
    endpoint_listening,
    killpg,
    process_tree,
    raise_descriptor_limit,
    socket_inodes,
    substitute,
    tcp_listeners,
    unix_listeners,
)
from .recipe import KernelRecipe, LaunchFailed
from .relay import ACCEPT_BACKOFF, UNPROVEN_MAX, UNPROVEN_MIN, Relay
from .spec import LaunchSpec
from .wire import LINE_MAX, challenge, encode_line, proven

STDERR_TAIL_LINES = 50
RUNTIME_DIR_PREFIX = "jupyter-sshp-"
KEPT_READY = "kept-ready"  # in the runtime dir while a start has not taken the kernel
BIND_ATTEMPTS = 5
PORT_TAKEN = "Address already in use"  # what a kernel says when it lost a port race
TERMINATE_GRACE = 3.0
LAST_WORDS_WAIT = 2.0
RELAY_CHUNK = 8192

PROLOGUE_CWD = "SSHP_PROLOGUE_CWD"  # set by a Slurm prologue's runner: where it left off


def do_nothing() -> None:
    pass


def name_is_signal(name: Any) -> bool:
    return name is None or (
        isinstance(name, str) and name.startswith("SIG") and not name.startswith("SIG_")
    )


class Supervisor:
    """The kernel process's whole life on the host: runtime dir, process group, ports
    audit, control socket, relay and orphan clock.

    Why one class of this size: they all end together in one ``finish`` that must see
    each of them, from whichever thread notices the end first; what the kernel is started
    with is recipe.py's, the ports it opens later ports.py's, and the helpers that need
    no such state process.py's, orphan.py's and output.py's."""

    def __init__(self, spec: LaunchSpec) -> None:
        self.spec = spec
        self.transport = spec.transport
        self.events: queue.Queue[Any] = queue.Queue()
        self.stderr_tail: Any = collections.deque(maxlen=STDERR_TAIL_LINES)
        # mode 0700; named after its kernel (what `ls /tmp` shows an operator)
        label = spec.kernel_id[:8]
        prefix = RUNTIME_DIR_PREFIX + (label + "-" if label else "")
        self.runtime_dir = tempfile.mkdtemp(prefix=prefix)
        if spec.kept_ready:  # for `ssh-provisioner check` (and an operator's ls)
            open(os.path.join(self.runtime_dir, KEPT_READY), "w").close()
        self.process: Optional[subprocess.Popen[bytes]] = None
        self.pgid = 0
        self.stdin_closed = threading.Event()
        self.generation = 0
        self.release_session: Callable[[], None] = do_nothing  # see detach()
        self.ready_event: Dict[str, Any] = {}
        self.control_path = ""
        self.kernel_groups: Set[int] = set()
        self.stream_relay: Optional[Relay] = None
        self.orphaned = False
        self.client: Optional[socket.socket] = None  # attached over the control socket
        prologue_cwd = os.environ.pop(PROLOGUE_CWD, "")  # not the kernel's to see
        self.recipe = KernelRecipe(spec, self.runtime_dir, prologue_cwd)
        self.port_watch: Optional[PortWatch] = None
        self.kernel_ports: Dict[int, str] = {}  # the kernel's own listeners: port -> address

    # -- setup -------------------------------------------------------------------

    # -- kernel process --------------------------------------------------------------

    def relay(self, pipe: Any) -> None:
        # Bounded reads: a kernel's 4 MiB line arrives as pieces, never as one line
        # that a reader on the other end would have to hold whole.
        for raw in iter(lambda: pipe.readline(RELAY_CHUNK), b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.stderr_tail.append(line)
            try:
                sys.stderr.write(line + "\n")
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
        pipe.close()

    def spawn(self, argv: List[str], env: Dict[str, str], cwd: str) -> None:
        executable = shutil.which(argv[0], path=env.get("PATH")) if "/" not in argv[0] else argv[0]
        if executable is None or not os.path.exists(executable):
            raise LaunchFailed(
                "argv-not-found",
                "kernel command %r not found on the host (PATH=%s)"
                % (argv[0], env.get("PATH", "")),
            )
        become_subreaper()
        try:
            # start_new_session: the kernel leads its own process group, so killpg reaches
            # it and its children and never this launcher.  Signal dispositions the
            # launcher *ignores* would be inherited; it ignores none (see main()).
            self.process = subprocess.Popen(
                [executable, *argv[1:]],
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise LaunchFailed(
                "argv-not-executable", "cannot start %r on the host: %s" % (argv[0], exc)
            ) from exc
        self.pgid = self.process.pid
        self.stderr_tail.clear()
        self.relay_thread = threading.Thread(
            target=self.relay, args=(self.process.stdout,), daemon=True
        )
        self.relay_thread.start()

    def wait_until_listening(self, endpoints: Dict[str, Any], deadline: float) -> None:
        """Return once the kernel listens on every endpoint.

        Probes are plain connects (cheap).  For tcp on Linux a port then counts only if
        *this* kernel's process group holds the listening socket: kernels started at the
        same moment on one host can be handed the same free port, and a probe would
        mistake another kernel's socket for ours.  Such a clash raises ``port-taken``
        and the start is retried.  (Reading /proc/net/tcp costs milliseconds on a busy
        host, so it is read when all ports answer, and once a second before that.)
        """
        assert self.process is not None
        ports = set(endpoints.values()) if self.transport == "tcp" else set()
        pending = list(endpoints.values())
        started = time.monotonic()
        next_audit = started + 1.0
        while True:
            if self.process.poll() is not None:
                self.process.wait()
                self.relay_thread.join(1.0)  # the kernel's last words
                raise LaunchFailed(
                    "kernel-exited",
                    "the kernel exited with status %s before it was ready"
                    % self.process.returncode,
                    "\n".join(self.stderr_tail),
                    self.process.returncode,
                )
            if self.stdin_closed.is_set():
                raise LaunchFailed("aborted", "the client went away before the kernel was ready")
            if any(PORT_TAKEN in line for line in list(self.stderr_tail)):
                # ipykernel can live on after a failed bind (its IOPub thread keeps the
                # process): it would never listen, so retry now, with other ports
                raise LaunchFailed(
                    "port-taken",
                    "the kernel lost a port to another process",
                    "\n".join(self.stderr_tail),
                )
            now = time.monotonic()
            if now > deadline:
                raise LaunchFailed("ready-timeout", "the kernel did not open its ports in time")
            pending = [e for e in pending if not endpoint_listening(self.transport, e)]
            answering = ports - set(pending)
            if answering and (not pending or now >= next_audit):
                self.check_ownership(answering)
                next_audit = now + 1.0
            if not pending:
                return
            # Poll at about 5% of the time waited so far: quick for a quick kernel, and
            # cheap when many kernels start at once and each takes seconds.
            time.sleep(min(0.05, max(0.002, (now - started) / 20)))

    def check_ownership(self, ports: Set[int]) -> None:
        listeners = tcp_listeners(ports)
        if listeners is None:
            return  # no /proc: trust the probes
        owned = socket_inodes(process_tree(os.getpid()))
        foreign = sorted(p for p, inode in listeners.items() if inode not in owned)
        if foreign:
            raise LaunchFailed("port-taken", "port(s) %s were taken by another process" % foreign)

    def listening_groups(self, endpoints: Dict[str, Any]) -> Set[int]:
        """The process groups of the processes that listen on the kernel's endpoints:
        where signals go.  Not a wrapper's group (``setsid -w`` would die of an
        interrupt meant for the kernel); the launcher's child's group when no listener
        is found here (a wrapper such as srun runs the kernel elsewhere, and forwards)."""
        if self.transport == "ipc":
            inodes = unix_listeners(set(endpoints.values()))
        else:
            inodes = set((tcp_listeners(set(endpoints.values())) or {}).values())
        groups = set()
        for pid, pgid in process_tree(os.getpid()).items():
            if inodes & socket_inodes([pid]):
                groups.add(pgid)
        groups.discard(os.getpgid(0))
        return groups or {self.pgid}

    def start(self, early: Callable[[Dict[str, Any]], None]) -> Dict[str, Any]:
        """Start the kernel; the ready event once it listens.  The relay listens first,
        and ``early`` is told where: the client opens and proves its channels while the
        kernel starts (the relay takes their streams to the kernel once it is ready)."""
        recipe = self.recipe
        kernel_argv, env, resource_dir = recipe.kernel_command()
        cwd = recipe.kernel_cwd()
        deadline = time.monotonic() + self.spec.ready_timeout
        relay = self.stream_relay = Relay(self.spec, self.transport, {}, self.runtime_dir)
        early(
            {
                "event": "relay",
                "relay": relay.address,
                "relay_host": relay.host,
                "answers_zmtp": relay.answers_zmtp,
                "launcher_pid": os.getpid(),
                "runtime_dir": self.runtime_dir,
            }
        )
        for attempt in range(1, BIND_ATTEMPTS + 1):
            endpoints = recipe.endpoints(attempt)
            relay.endpoints = endpoints
            connection_file = recipe.connection_file(endpoints, attempt)
            names = {"connection_file": connection_file, "resource_dir": resource_dir}
            argv = [substitute(arg, names) for arg in kernel_argv]
            self.spawn(argv, env, cwd)
            try:
                self.wait_until_listening(endpoints, deadline)
            except LaunchFailed as exc:
                raced = exc.reason == "port-taken" or (
                    exc.reason == "kernel-exited" and PORT_TAKEN in exc.stderr
                )
                if raced and attempt < BIND_ATTEMPTS:
                    log("%s; retrying with other ports" % exc.message)
                    self.stop_kernel()
                    os.unlink(connection_file)
                    continue
                raise
            self.kernel_groups = self.listening_groups(endpoints)
            self.ready_event = {
                "event": "ready",
                "pid": self.process.pid if self.process else 0,
                "pgid": self.pgid,
                "endpoints": endpoints,
                "runtime_dir": self.runtime_dir,
                "connection_file": connection_file,
                "cwd": cwd,
                "home": os.path.expanduser("~"),
                "hostname": socket.gethostname(),
                "launcher_pid": os.getpid(),
                "cwd_note": recipe.cwd_note,
            }
            descriptors = raise_descriptor_limit()  # the kernel, started above, keeps its own
            relay.unproven_max = max(UNPROVEN_MIN, min(UNPROVEN_MAX, descriptors // 4))
            self.ready_event["relay"] = relay.address
            self.ready_event["answers_zmtp"] = relay.answers_zmtp
            self.ready_event["relay_host"] = relay.host
            self.listen_for_reattach()
            self.stream_relay.control_path = self.control_path
            if self.spec.watch_ports:
                own = set(endpoints.values()) if self.transport == "tcp" else set()
                self.port_watch = PortWatch(
                    os.getpid(), own, lambda ports: self.events.put(("ports", ports))
                )
                self.port_watch.start()
            # Its working directory names its kernel too (`ls -l /proc/PID/cwd`); the
            # kernel's own was set above, and every path the launcher uses is absolute.
            os.chdir(self.runtime_dir)
            return dict(self.ready_event, control=self.control_path)
        raise AssertionError("unreachable")

    # -- supervision -------------------------------------------------------------------

    def read_control(self) -> None:
        for line in sys.stdin:
            self.events.put(("line", (0, line)))
        self.stdin_closed.set()
        self.events.put(("eof", 0))

    def listen_for_reattach(self) -> None:
        """A 0600 Unix socket in the private runtime dir: a client whose SSH channel was
        lost comes back here (through `attach`) with the token it was given."""
        token = self.spec.attach_token
        if not token:
            return
        path = os.path.join(self.runtime_dir, "control")
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            server.bind(path)
        finally:
            os.umask(old_umask)
        server.listen(4)
        self.control_path = path

        def accept() -> None:
            # One failed accept (EMFILE while something floods the relay) must not
            # close the door for good: the next blip would lose the kernel.
            while server.fileno() >= 0:
                try:
                    conn, _ = server.accept()
                except OSError as exc:
                    if exc.errno in (errno.EBADF, errno.EINVAL):
                        return  # closed
                    time.sleep(ACCEPT_BACKOFF)
                    continue
                threading.Thread(target=self.authenticate, args=(conn, token), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()

    def authenticate(self, conn: socket.socket, token: str) -> None:
        """Challenge-response on the token, both ways: this launcher proves it knows the
        token before the client does, so neither side ever sends it (see wire)."""
        conn.settimeout(10)
        reader = conn.makefile("rb")
        try:
            hello = json.loads(reader.readline(LINE_MAX))
            nonce, message = challenge(token, "launcher", hello)
            conn.sendall(encode_line(message))
            trusted = proven(token, hello, nonce, json.loads(reader.readline(LINE_MAX)))
        except (ValueError, KeyError, TypeError, AttributeError, OSError):
            trusted = False
        if not trusted:
            log("refused a control connection that could not prove it knows the token")
            conn.close()
            return
        conn.settimeout(None)
        self.events.put(("attach", (conn, reader)))

    def read_client(self, reader: Any, generation: int) -> None:
        for raw in iter(reader.readline, b""):
            self.events.put(("line", (generation, raw.decode("utf-8", "replace"))))
        self.events.put(("eof", generation))

    def take_client(self, conn: socket.socket, reader: Any) -> None:
        self.generation += 1
        self.client = conn
        with CLIENT.lock:
            CLIENT.write = conn.sendall
        emit(dict(self.ready_event, event="attached"))
        if self.kernel_ports:
            self.emit_ports()
        threading.Thread(
            target=self.read_client, args=(reader, self.generation), daemon=True
        ).start()
        release, self.release_session = self.release_session, do_nothing
        release()

    def wait_kernel(self) -> None:
        assert self.process is not None
        self.events.put(("exit", self.process.wait()))

    def handle_control(self, line: str) -> None:
        try:
            message = json.loads(line)
            if message.get("op") == "signal":
                self.signal_kernel(message)
            elif message.get("op") == "notice" and self.stream_relay is not None:
                self.stream_relay.post_notice(str(message["text"]))
            elif message.get("op") == "taken":
                log("taken by kernel %s" % message.get("kernel_id"))
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(self.runtime_dir, KEPT_READY))
        except (ValueError, TypeError, KeyError, OverflowError) as exc:
            log("ignored a malformed control line: %s" % exc)

    def supervise(self) -> int:
        threading.Thread(target=self.wait_kernel, daemon=True).start()
        clock = OrphanClock(
            self.spec.liveness_timeout,
            self.spec.orphan_timeout,
            TERMINATE_GRACE,
            time.monotonic(),
        )
        while True:
            for action in clock.due(time.monotonic()):
                if action == OrphanClock.GONE:
                    log("no word from the client for %gs; counting it as gone" % clock.liveness)
                elif action == OrphanClock.TERMINATE:
                    log("no client for %gs; terminating the kernel" % clock.orphan)
                    self.orphaned = True
                    killpg(self.pgid, signal.SIGTERM)
                elif action == OrphanClock.KILL:
                    killpg(self.pgid, signal.SIGKILL)
            wait = clock.next_wakeup(time.monotonic())
            try:
                kind, value = self.events.get(timeout=max(0.01, wait) if wait is not None else None)
            except queue.Empty:
                continue
            if kind == "line":
                generation, line = value
                self.handle_control(line)
                if generation == self.generation:
                    clock.heard(time.monotonic())
            elif kind == "eof" and value == self.generation:  # the current client left
                clock.left(time.monotonic())
            elif kind == "attach":
                self.take_client(*value)
                clock.attached(time.monotonic())
                log("a client reattached")
            elif kind == "ports":
                self.kernel_ports = value
                if self.stream_relay is not None:  # before the client hears of them
                    self.stream_relay.forwardable = {
                        "tcp:%d" % port: (reachable_at(address), port)
                        for port, address in value.items()
                    }
                self.emit_ports()
            elif kind == "exit":
                return int(value)

    def emit_ports(self) -> None:
        ports = {str(port): address for port, address in sorted(self.kernel_ports.items())}
        emit({"event": "ports", "ports": ports})

    def signal_kernel(self, message: Dict[str, Any]) -> None:
        """Deliver a signal, named (numbers differ between systems) or numbered."""
        name = message.get("name")
        signum = getattr(signal, name, None) if isinstance(name, str) else None
        if signum is None and name is None:
            signum = int(message["signum"])
        if not isinstance(signum, int) or not name_is_signal(name):
            log("refused signal %r: this host has no such signal" % (name or signum))
            return
        self.send(signum)

    def send(self, signum: int) -> None:
        """To the kernel's process groups: its own, and those its wrapper made (setsid)."""
        for pgid in self.kernel_groups or {self.pgid}:
            if pgid:
                killpg(pgid, signum)

    def end_everything(self) -> None:
        """SIGKILL to the kernel's groups and to whatever else descends from us."""
        groups = set(self.kernel_groups) | set(process_tree(os.getpid()).values())
        groups.add(self.pgid)
        groups.discard(os.getpgid(0))
        for pgid in groups:
            if pgid:
                killpg(pgid, signal.SIGKILL)

    def stop_kernel(self) -> None:
        """Used when giving up before the handshake: nothing of the kernel may remain."""
        self.end_everything()
        if self.process is not None:
            self.process.wait()

    def deliver_last_words(self) -> None:
        """The exit event is on its way to a client attached through the relay: let the
        relay's bridge pass it on before this process (and its threads) ends."""
        relay = self.stream_relay
        if self.client is None or relay is None or not relay.bridges:
            return
        with contextlib.suppress(OSError):
            self.client.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + LAST_WORDS_WAIT
        for passed_on in relay.bridges:
            passed_on.wait(max(0.0, deadline - time.monotonic()))

    def cleanup(self) -> None:
        if self.port_watch is not None:
            self.port_watch.stop()
        if self.pgid:
            # Whatever the kernel left behind has lost its owner.
            self.end_everything()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
