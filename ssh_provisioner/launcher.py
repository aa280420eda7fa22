"""The supervisor that runs on the kernel's host.

Standard library only, Python >= 3.6 (no newer idiom: ruff lints it for py37, the
tests run it on every interpreter from 3.6 to 3.13): its source travels over the SSH channel
(see ``BOOTSTRAP``), so nothing needs installing on the host but Python and the
kernel.  Protocol, one JSON document per line:

stdin   line 1   the launcher source (consumed by ``BOOTSTRAP``)
        line 2   the launch spec (argv, env, transport, session key, ...)
        then     control lines: ``{"op": "signal", "signum": N}``, ``{"op": "ping"}``
stdout  ready    ``{"event": "ready", "pid", "pgid", "endpoints", ...}``
        error    ``{"event": "error", "reason", "message", "stderr"}``
        exit     ``{"event": "exit", "status": N}``   (Popen convention: -N = signal)

The kernel's own stdout/stderr are relayed to the launcher's stderr.
When the client leaves while the kernel runs, the kernel's process group is killed
after ``orphan_timeout`` seconds unless a client reattaches.  The client has left when
its channel reaches EOF, or when it has sent nothing (it pings) for ``liveness_timeout``
seconds: over a cut link sshd keeps the session open until its TCP keepalive gives up,
hours later, so EOF alone would leave the kernel running that long.
"""

import collections
import contextlib
import errno
import json
import os
import queue
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Set

CHANNELS = ("shell", "iopub", "stdin", "control", "hb")
STDERR_TAIL_LINES = 40
RUNTIME_DIR_PREFIX = "jupyter-sshp-"
BIND_ATTEMPTS = 5
TERMINATE_GRACE = 3.0
LAST_WORDS_WAIT = 2.0
RELAY_CHUNK = 8192
NO_SPEC = 2  # exit status of a spare launcher no spec reached in time (remote.py)
PROLOGUE_CWD = "SSHP_PROLOGUE_CWD"  # set by a Slurm prologue's runner: where it left off

# Run by the remote shell as `python -c BOOTSTRAP`; the launcher source is the first
# stdin line, so no secret and no script ever appears on a command line.  Its first
# output is the line LAUNCHER_BEGINS (after a newline): whatever a login shell printed
# before it (a banner, `module` or conda chatter in .bashrc) is not the launcher's.
LAUNCHER_BEGINS = "ssh-provisioner launcher output begins"
BOOTSTRAP = (
    "import sys,json;"
    "sys.stdout.write('\\n" + LAUNCHER_BEGINS + "\\n');sys.stdout.flush();"
    "exec(compile(json.loads(sys.stdin.readline()),'ssh_provisioner_launcher','exec'))"
)


class LaunchFailed(Exception):
    def __init__(self, reason: str, message: str, stderr: str = "", status: Optional[int] = None):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.stderr = stderr
        self.status = status


class Client:
    """Where events go: the launcher's own stdout, or a reattached control connection."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.write: Callable[[bytes], Any] = self.write_stdout

    @staticmethod
    def write_stdout(data: bytes) -> None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()


CLIENT = Client()


def emit(event: Dict[str, Any]) -> None:
    data = (json.dumps(event) + "\n").encode()
    # A gone client is no error: supervision goes on without a listener.
    with CLIENT.lock, contextlib.suppress(OSError, ValueError):
        CLIENT.write(data)


def log(message: str) -> None:
    try:
        sys.stderr.write("ssh-provisioner launcher: " + message + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def killpg(pgid: int, signum: int) -> bool:
    try:
        os.killpg(pgid, signum)
    except OSError:  # gone, not ours, or a signal this host does not have
        return False
    return True


def process_tree(root: int) -> Dict[int, int]:
    """pid -> process group of every descendant of ``root``; {} without /proc."""
    table = {}  # type: Dict[int, List[int]]
    try:
        entries = os.listdir("/proc")
    except OSError:
        return {}
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                fields = f.read().rpartition(")")[2].split()
            table[int(entry)] = [int(fields[1]), int(fields[2])]  # ppid, pgid
        except (OSError, ValueError, IndexError):
            continue
    children = {}  # type: Dict[int, List[int]]
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found = {}  # type: Dict[int, int]
    pending = [root]
    while pending:
        for child in children.get(pending.pop(), ()):
            if child not in found:
                found[child] = table[child][1]
                pending.append(child)
    return found


def raise_descriptor_limit() -> int:
    """The launcher serves every client connection of its kernel (and whoever else
    connects to its relay): its soft descriptor limit goes up to the hard one (at most
    DESCRIPTORS_WANTED).  Returns the limit now in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = DESCRIPTORS_WANTED if hard == resource.RLIM_INFINITY else min(hard, DESCRIPTORS_WANTED)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    return DESCRIPTORS_WANTED if soft == resource.RLIM_INFINITY else soft


def become_subreaper() -> None:
    """Descendants orphaned by a wrapper that exits (or a kernel that daemonizes) are
    re-parented to this launcher, so they stay in its tree and end with it (Linux)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


ARGV_FIELD = re.compile(r"\{([A-Za-z0-9_]+)\}")


def substitute(arg: str, names: Dict[str, str]) -> str:
    """jupyter_client's rule: only ``{name}`` with a known name is replaced; every other
    brace (``${X:-y}``, ``{}``, ``{x:>8}``) stays as written."""
    return ARGV_FIELD.sub(lambda match: names.get(match.group(1), match.group(0)), arg)


def pick_tcp_ports(count: int) -> List[int]:
    """Let this host's kernel choose free ports: bind them all at once, then release."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def endpoint_listening(transport: str, endpoint: Any) -> bool:
    family = socket.AF_UNIX if transport == "ipc" else socket.AF_INET
    address = endpoint if transport == "ipc" else ("127.0.0.1", endpoint)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(0.5)
        sock.connect(address)
    except OSError:
        return False
    finally:
        sock.close()
    return True


def tcp_listeners(ports: Set[int]) -> Optional[Dict[int, int]]:
    """Port -> socket inode of the IPv4 listeners on ``ports``; None without /proc."""
    try:
        with open("/proc/net/tcp") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return None
    found = {}
    for line in lines:
        fields = line.split()
        if len(fields) < 10 or fields[3] != "0A":  # 0A: LISTEN
            continue
        address, _, port_hex = fields[1].partition(":")
        port = int(port_hex, 16)
        if port in ports and address in ("0100007F", "00000000"):
            found[port] = int(fields[9])
    return found


def unix_listeners(paths: Set[str]) -> Set[int]:
    """Socket inodes of the Unix listeners bound to ``paths``."""
    try:
        with open("/proc/net/unix") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return set()
    found = set()
    for line in lines:
        fields = line.split()
        # Num RefCount Protocol Flags Type St Inode Path; flag 0x10000: listening
        if len(fields) >= 8 and int(fields[3], 16) & 0x10000 and fields[7] in paths:
            found.add(int(fields[6]))
    return found


def socket_inodes(pids: Any) -> Set[int]:
    """Inodes of the sockets that the processes ``pids`` hold open."""
    inodes = set()
    for pid in pids:
        fd_dir = "/proc/%d/fd" % pid
        try:
            for fd in os.listdir(fd_dir):
                link = os.readlink(os.path.join(fd_dir, fd))
                if link.startswith("socket:["):
                    inodes.add(int(link[8:-1]))
        except (OSError, ValueError):
            continue
    return inodes


class Supervisor:
    def __init__(self, spec: Dict[str, Any]) -> None:
        self.spec = spec
        self.transport = spec["transport"]
        self.events = queue.Queue()  # type: queue.Queue[Any]
        self.stderr_tail = collections.deque(maxlen=STDERR_TAIL_LINES)  # type: Any
        # mode 0700; named after its kernel (what `ls /tmp` shows an operator)
        label = str(spec.get("kernel_id") or "")[:8]
        prefix = RUNTIME_DIR_PREFIX + (label + "-" if label else "")
        self.runtime_dir = tempfile.mkdtemp(prefix=prefix)
        self.process = None  # type: Optional[subprocess.Popen[bytes]]
        self.pgid = 0
        self.stdin_closed = threading.Event()
        self.generation = 0
        self.release_session = do_nothing  # type: Callable[[], None]  # see detach()
        self.ready_event = {}  # type: Dict[str, Any]
        self.control_path = ""
        self.kernel_groups = set()  # type: Set[int]
        self.stream_relay = None  # type: Optional[Relay]
        self.orphaned = False
        self.client = None  # type: Optional[socket.socket]  # attached over the control socket
        self.prologue_cwd = os.environ.pop(PROLOGUE_CWD, "")  # not the kernel's to see

    # -- setup -------------------------------------------------------------------

    def write_private(self, name: str, data: bytes) -> str:
        path = os.path.join(self.runtime_dir, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return path

    def resource_dir(self) -> str:
        files = self.spec.get("resource_files") or {}
        if not files:
            return self.runtime_dir
        import base64  # only here: every import delays the kernel's start

        path = os.path.join(self.runtime_dir, "resources")
        os.mkdir(path, 0o700)
        for name, encoded in files.items():
            if "/" in name or name in (".", ".."):
                continue
            with open(os.path.join(path, name), "wb") as f:
                f.write(base64.b64decode(encoded))
        return path

    def kernel_env(self) -> Dict[str, str]:
        env = dict(os.environ)
        env.update(self.spec.get("env") or {})
        templates = self.spec.get("env_templates") or []
        if templates:
            from string import Template

            for name, template in templates:
                env[name] = Template(template).safe_substitute(env)
        return env

    def kernel_cwd(self) -> str:
        # remote_cwd, else where a Slurm prologue's `cd` left its shell, else home
        cwd = os.path.expanduser(self.spec.get("cwd") or self.prologue_cwd or "~")
        if not os.path.isdir(cwd):
            raise LaunchFailed(
                "cwd-not-found", "remote_cwd %r is not a directory on the host" % cwd
            )
        return cwd

    def endpoints(self, attempt: int) -> Dict[str, Any]:
        if self.transport == "ipc":
            prefix = os.path.join(self.runtime_dir, "k%d" % attempt)
            return {name: "%s-%d" % (prefix, i + 1) for i, name in enumerate(CHANNELS)}
        return dict(zip(CHANNELS, pick_tcp_ports(len(CHANNELS))))

    def connection_file(self, endpoints: Dict[str, Any], attempt: int) -> str:
        info = dict(self.spec["connection"])  # type: Dict[str, Any]
        info["transport"] = self.transport
        if self.transport == "ipc":
            info["ip"] = endpoints["shell"].rsplit("-", 1)[0]
            for i, name in enumerate(CHANNELS):
                info[name + "_port"] = i + 1
        else:
            info["ip"] = "127.0.0.1"
            for name in CHANNELS:
                info[name + "_port"] = endpoints[name]
        name = "kernel-%s-%d.json" % (self.spec["kernel_id"], attempt)
        return self.write_private(name, json.dumps(info, indent=1).encode())

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

    def start(self) -> Dict[str, Any]:
        env = self.kernel_env()
        cwd = self.kernel_cwd()
        resource_dir = self.resource_dir()
        deadline = time.monotonic() + float(self.spec.get("ready_timeout", 60))
        for attempt in range(1, BIND_ATTEMPTS + 1):
            endpoints = self.endpoints(attempt)
            connection_file = self.connection_file(endpoints, attempt)
            names = {"connection_file": connection_file, "resource_dir": resource_dir}
            argv = [substitute(arg, names) for arg in self.spec["argv"]]
            self.spawn(argv, env, cwd)
            try:
                self.wait_until_listening(endpoints, deadline)
            except LaunchFailed as exc:
                raced = exc.reason == "port-taken" or (
                    exc.reason == "kernel-exited" and "Address already in use" in exc.stderr
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
            }
            descriptors = raise_descriptor_limit()  # the kernel, started above, keeps its own
            self.stream_relay = Relay(self.spec, self.transport, endpoints, self.runtime_dir)
            self.stream_relay.unproven_max = max(UNPROVEN_MIN, min(UNPROVEN_MAX, descriptors // 4))
            self.ready_event["relay"] = self.stream_relay.address
            self.ready_event["relay_host"] = self.stream_relay.host
            self.listen_for_reattach()
            self.stream_relay.control_path = self.control_path
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
        token = self.spec.get("attach_token")
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
        token before the client does, so neither side ever sends it (see prove())."""
        conn.settimeout(10)
        reader = conn.makefile("rb")
        try:
            client_nonce = str(json.loads(reader.readline(4096))["hello"])
            nonce = os.urandom(16).hex()
            mine = prove(token, "launcher", client_nonce, nonce)
            conn.sendall((json.dumps({"challenge": nonce, "proof": mine}) + "\n").encode())
            answer = json.loads(reader.readline(4096))
            expected = prove(token, "client", nonce, client_nonce)
            import hmac

            trusted = hmac.compare_digest(str(answer["proof"]), expected)
        except (ValueError, KeyError, TypeError, OSError):
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

    def attach(self, conn: socket.socket, reader: Any) -> None:
        self.generation += 1
        self.client = conn
        with CLIENT.lock:
            CLIENT.write = conn.sendall
        emit(dict(self.ready_event, event="attached"))
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
        except (ValueError, TypeError, KeyError, OverflowError) as exc:
            log("ignored a malformed control line: %s" % exc)

    def supervise(self) -> int:
        threading.Thread(target=self.wait_kernel, daemon=True).start()
        clock = OrphanClock(
            float(self.spec.get("liveness_timeout") or 0),
            float(self.spec["orphan_timeout"]),
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
                self.attach(*value)
                clock.attached(time.monotonic())
                log("a client reattached")
            elif kind == "exit":
                return int(value)

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
        if self.pgid:
            # Whatever the kernel left behind has lost its owner.
            self.end_everything()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)


class OrphanClock:
    """When a kernel nobody attends to is ended.  Pure: the time is passed in.

    The client is gone when its channel reaches EOF (``left``), or when it has sent
    nothing for ``liveness`` seconds (0: silence never counts).  ``orphan`` seconds
    after that the kernel gets SIGTERM, and SIGKILL ``grace`` seconds later.  A client
    that speaks again after a silence stops the countdown (it was slow, not gone),
    unless SIGTERM went out; one that reattaches always stops it."""

    GONE, TERMINATE, KILL = "gone", "terminate", "kill"

    def __init__(self, liveness: float, orphan: float, grace: float, now: float) -> None:
        self.liveness, self.orphan, self.grace = liveness, orphan, grace
        self.last_heard = now
        self.orphan_deadline = None  # type: Optional[float]
        self.terminated_at = None  # type: Optional[float]
        self.silent = False  # the countdown runs because the client fell silent
        self.killed = False  # SIGKILL went out: nothing is due any more

    def _listening(self) -> bool:
        waiting = self.orphan_deadline is None and self.terminated_at is None
        return bool(self.liveness) and waiting and not self.killed

    def heard(self, now: float) -> None:
        self.last_heard = now
        if self.silent and self.terminated_at is None:
            self.orphan_deadline, self.silent = None, False

    def left(self, now: float) -> None:
        self.orphan_deadline = now + self.orphan
        self.silent = False

    def attached(self, now: float) -> None:
        self.orphan_deadline = self.terminated_at = None
        self.last_heard, self.silent = now, False

    def due(self, now: float) -> List[str]:
        """What is due at ``now``, in order; each action is reported once."""
        actions = []  # type: List[str]
        if self.killed:
            return actions
        if self._listening() and now >= self.last_heard + self.liveness:
            actions.append(self.GONE)
            self.orphan_deadline, self.silent = now + self.orphan, True
        if self.orphan_deadline is not None and now >= self.orphan_deadline:
            actions.append(self.TERMINATE)
            self.orphan_deadline, self.terminated_at = None, now
        if self.terminated_at is not None and now >= self.terminated_at + self.grace:
            actions.append(self.KILL)
            self.terminated_at, self.killed = None, True
        return actions

    def next_wakeup(self, now: float) -> Optional[float]:
        """Seconds until something may be due, or None: nothing until an event."""
        times = []  # type: List[float]
        if self.killed:
            return None
        if self.orphan_deadline is not None:
            times.append(self.orphan_deadline)
        if self._listening():
            times.append(self.last_heard + self.liveness)
        if self.terminated_at is not None:
            times.append(self.terminated_at + self.grace)
        return min(times) - now if times else None


# -- the relay: client connections that outlive a lost SSH connection -----------------
#
# Each connection a client makes to one of the kernel's local ports becomes a *stream*:
# the relay holds the stream's connection to the kernel here for as long as the stream
# lives, and the provisioner holds the client's.  Between them an SSH channel carries
# frames; when the SSH connection is lost, both ends keep what the other has not
# confirmed, and a new channel resumes the stream where it stopped.  So nothing the
# kernel sends while the link is down is lost (within ``outage_buffer`` bytes), and the
# kernel's ZMQ sockets never see their peer leave.
#
# A channel starts with two JSON lines each way, a challenge-response on the attach
# token (neither end sends it, both prove they know it):
#   client  {"hello": NONCE, "stream": ID, "channel": NAME, "resume": BOOL, "received": N}
#   relay   {"nonce": NONCE2, "proof": prove(token, "relay", NONCE, NONCE2)}
#   client  {"proof": prove(token, "client", NONCE2, NONCE)}
#   relay   (resume only) {"received": M, "dropped": ...} or {"error": WHY}
# then frames: FRAME_HEADER (kind, bytes received so far from the other end, size) and
# the payload.  Every frame acknowledges what its sender has received; a receiver that
# sends nothing back acknowledges on its own every ACK_EVERY bytes.

LAUNCHER_CHANNEL = "launcher"  # not a kernel channel: the launcher's control socket
FRAME_HEADER = struct.Struct(">cQI")
FRAME_DATA, FRAME_ACK, FRAME_CLOSE = b"D", b"A", b"C"
FRAME_PAYLOAD_MAX = 65536
ACK_EVERY = 128 * 1024
HANDSHAKE_LINE_MAX = 4096
# Anyone on the host may connect to a relay on TCP: connections that have not proven
# the token yet are few (the oldest goes first) and short-lived, and streams per kernel
# channel are capped, so that no flood takes the launcher to its descriptor limit.
HANDSHAKE_TIMEOUT = 5.0
UNPROVEN_MIN, UNPROVEN_MAX = 64, 1024  # a quarter of the descriptor limit, within these
STREAMS_PER_CHANNEL_MAX = 64
DESCRIPTORS_WANTED = 65536
ACCEPT_BACKOFF = 0.2  # out of descriptors: the listener stays readable; wait, don't spin
LINK_OUTPUT_HIGH = 256 * 1024  # frame more of the stream once the channel took this in
TO_KERNEL_HIGH = 1024 * 1024  # stop reading the channel while the kernel lags this much
DEFAULT_OUTAGE_BUFFER = 32 * 1024 * 1024  # all streams together: the launcher's budget
# The buffer also holds what is on its way to the client (up to an SSH channel window,
# 2 MiB with asyncssh) and not yet acknowledged: a smaller one would drop output of a
# client that keeps up.
MIN_OUTAGE_BUFFER = 4 * 1024 * 1024
# While the client keeps up, the relay reads the kernel only this far ahead of what the
# client confirmed: past it the kernel's own socket waits (and drops by its high-water
# mark), exactly as without a relay.  A client that confirms nothing for STALL_AFTER
# seconds meanwhile is taken for a cut link not noticed yet: the relay reads on, into
# the outage buffer.
IN_FLIGHT_MAX = 2 * 1024 * 1024
STALL_AFTER = 2.0
# A client that confirms nothing while other clients of the same link do is slow, not
# cut off: it gets what a ZMQ socket gives a slow peer (the kernel's socket keeps what
# it does not read, and PUB drops past its high-water mark), never the outage buffer.
# Whatever the clients do, the streams together hold at most the budget (outage_buffer)
# plus a quarter of it for messages that are never dropped, plus FAIR_SHARE a stream:
# a client that keeps up always gets its share, however much the others hold.
FAIR_SHARE = 256 * 1024


class MessageCutter:
    """Follows the ZMTP 3 byte stream a kernel's socket sends, to tell where each
    message starts and ends, so that whole messages can be dropped.  With CurveZMQ the
    boundaries are inside the encrypted boxes: the stream turns ``opaque``."""

    GREETING = 64
    KEEP_FRAME = 4096  # frames of a message kept for ``frames`` (the headers are small)

    def __init__(self) -> None:
        self.header = bytearray()
        self.kind = "greeting"
        self.remaining = self.GREETING
        self.more = False
        self.in_message = False
        self.body = bytearray()
        self.keeping = True
        self.frames = []  # type: List[bytes]
        self.opaque = False

    @property
    def between_messages(self) -> bool:
        return not self.in_message and not self.opaque

    def feed(self, data: bytes) -> List[Any]:
        """``data`` as segments: (bytes, starts a message, in a message, ends it)."""
        if self.opaque:
            return [(data, False, False, False)]
        segments = []  # type: List[Any]
        pos, size = 0, len(data)
        while pos < size:
            if self.remaining:
                chunk = data[pos : pos + self.remaining]
                pos += len(chunk)
                self.remaining -= len(chunk)
                if self.keeping:
                    self.body += chunk
                ends = False
                if not self.remaining:
                    ends = self.unit_done()
                segments.append((chunk, False, self.kind == "frame", ends))
                if self.opaque:
                    segments.append((data[pos:], False, False, False))
                    return [s for s in segments if s[0]]
                continue
            self.header.append(data[pos])
            pos += 1
            flags = self.header[0]
            need = 9 if flags & 0x02 else 2
            if len(self.header) < need:
                continue
            length = int.from_bytes(bytes(self.header[1:need]), "big")
            header = bytes(self.header)
            self.header.clear()
            self.kind = "command" if flags & 0x04 else "frame"
            self.more = bool(flags & 0x01)
            self.remaining = length
            self.body.clear()
            self.keeping = length <= self.KEEP_FRAME
            starts = self.kind == "frame" and not self.in_message
            if starts:
                self.in_message = True
                self.frames = []
            ends = self.unit_done() if not length else False
            segments.append((header, starts, self.kind == "frame", ends))
        return segments

    def unit_done(self) -> bool:
        """A greeting, command or frame is complete: True if it ended a message."""
        if self.kind == "command":
            name = bytes(self.body[1 : 1 + self.body[0]]) if self.body else b""
            self.opaque = name == b"MESSAGE"
            return False
        if self.kind != "frame":
            return False
        self.frames.append(bytes(self.body))
        if self.more:
            return False
        self.in_message = False
        return True


def zmtp_frames(parts: List[bytes]) -> bytes:
    out = bytearray()
    for index, part in enumerate(parts):
        more = 0x01 if index < len(parts) - 1 else 0
        if len(part) > 255:
            out += bytes([more | 0x02]) + len(part).to_bytes(8, "big")
        else:
            out += bytes([more, len(part)])
        out += part
    return bytes(out)


DROPPABLE_MESSAGES = ("stream", "display_data", "update_display_data")


def message_type(frames: List[bytes]) -> Optional[str]:
    """The msg_type of a Jupyter message whose header frame is among ``frames``; "" if
    it cannot be read, None while the header has not come yet."""
    if b"<IDS|MSG>" not in frames:
        return None
    index = frames.index(b"<IDS|MSG>") + 2
    if len(frames) <= index:
        return None
    try:
        return str(json.loads(frames[index].decode("utf-8"))["msg_type"])
    except (ValueError, KeyError, TypeError):
        return ""


def parent_of(frames: List[bytes]) -> bytes:
    """The parent header of a Jupyter message in ZMQ frames, or b"{}"."""
    try:
        return frames[frames.index(b"<IDS|MSG>") + 3]
    except (ValueError, IndexError):
        return b"{}"


def execution_state(frames: List[bytes]) -> Optional[str]:
    """ "busy" or "idle" for a status message, else None."""
    if message_type(frames) != "status":
        return None
    try:
        content = json.loads(frames[frames.index(b"<IDS|MSG>") + 5].decode("utf-8"))
        return str(content["execution_state"])
    except (ValueError, IndexError, KeyError, TypeError):
        return None


def stream_notice(connection: Dict[str, Any], parent: bytes, text: str) -> bytes:
    """A signed ``stream`` message (stderr) for IOPub, in ZMTP frames: what the user
    sees in the cell whose output was dropped."""
    import hashlib
    import hmac
    import uuid

    header = json.dumps(
        {
            "msg_id": uuid.uuid4().hex,
            "msg_type": "stream",
            "username": "ssh-provisioner",
            "session": uuid.uuid4().hex,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime()),
            "version": "5.3",
        }
    ).encode()
    content = json.dumps({"name": "stderr", "text": text}).encode()
    parts = [header, parent, b"{}", content]
    key = str(connection.get("key") or "").encode()
    scheme = str(connection.get("signature_scheme") or "hmac-sha256")
    signature = b""
    if key:
        digest = hmac.new(key, digestmod=getattr(hashlib, scheme.split("-", 1)[-1]))
        for part in parts:
            digest.update(part)
        signature = digest.hexdigest().encode()
    return zmtp_frames([b"stream.stderr", b"<IDS|MSG>", signature, *parts])


class RelayStream:
    """One client connection's stream: its connection to the kernel, and what each
    direction holds that the other end has not confirmed."""

    def __init__(self, sid: str, channel: str, kernel: socket.socket) -> None:
        self.sid, self.channel, self.kernel = sid, channel, kernel
        self.to_kernel = bytearray()
        self.received = 0  # client -> kernel bytes taken in
        self.told = 0  # ``received`` as the client last heard it
        self.unacked = bytearray()  # kernel -> client bytes the client has not confirmed
        self.acked = 0
        self.framed = 0  # bytes of ``unacked`` framed on the current link
        self.link = None  # type: Optional[RelayLink]
        self.left_at = 0.0
        self.kernel_eof = self.close_sent = self.reading_paused = False
        self.stalled = False  # the client confirmed nothing for STALL_AFTER while ahead
        self.progress_at = time.monotonic()  # the last confirmation, or the last pause
        self.cutter = MessageCutter() if channel == "iopub" else None
        self.deciding = False  # within a message that may be dropped: which type is it?
        self.undecided = bytearray()  # its start, until the type is known
        self.dropping = False  # within a message being dropped
        self.dropped_messages = self.dropped_bytes = 0
        self.parent = b"{}"
        self.last_parent = b"{}"  # of the last message kept
        self.busy = False  # the kernel's last status on this stream
        self.notices = []  # type: List[str]  # for the next gap between messages
        self.notice_for_next_cell = ""  # shown while idle: shown again in the next cell

    @property
    def to_frame(self) -> bool:
        """Has the stream more for its link: data not framed yet, or its CLOSE?"""
        return self.framed < len(self.unacked) or (self.kernel_eof and not self.close_sent)


class RelayLink:
    """One SSH channel's connection to the relay."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.phase = "hello"  # -> "proof" -> "open"
        self.hello = {}  # type: Dict[str, Any]
        self.nonce = ""
        self.stream = None  # type: Optional[RelayStream]
        self.since = time.monotonic()
        self.closing = False


def receive(sock: socket.socket) -> Optional[bytes]:
    """What a non-blocking socket has: None if nothing yet, b"" once closed or failed."""
    try:
        return sock.recv(65536)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""


def send_from(sock: socket.socket, buffer: bytearray) -> bool:
    """Send what a non-blocking socket takes of ``buffer`` now, and remove it from
    ``buffer``; False if the socket failed."""
    try:
        sent = sock.send(buffer)
    except (BlockingIOError, InterruptedError):
        return True
    except OSError:
        return False
    del buffer[:sent]
    return True


class Relay:
    """Serves resumable streams to the kernel's endpoints, on one thread (selectors)."""

    def __init__(
        self, spec: Dict[str, Any], transport: str, endpoints: Dict[str, Any], runtime_dir: str
    ) -> None:
        import selectors

        self.token = str(spec["attach_token"])
        self.connection = spec["connection"]  # type: Dict[str, Any]
        self.transport, self.endpoints = transport, endpoints
        self.bound = max(MIN_OUTAGE_BUFFER, int(spec.get("outage_buffer") or DEFAULT_OUTAGE_BUFFER))
        self.headroom = self.bound // 4  # for messages never dropped, during an outage
        self.heard_at = 0.0  # when a proven client's bytes last arrived: the link is up
        self.accept_resumes_at = None  # type: Optional[float]
        self.at_limit = set()  # type: Set[str]  # streams whose pause at the limit was logged
        self.refusals_logged = {}  # type: Dict[str, float]  # channel: when
        self.unproven_max = UNPROVEN_MIN
        self.linger = float(spec.get("stream_linger") or 120)
        self.streams = {}  # type: Dict[str, RelayStream]
        self.links = set()  # type: Set[RelayLink]
        self.selector = selectors.DefaultSelector()
        self.read_event, self.write_event = selectors.EVENT_READ, selectors.EVENT_WRITE
        self.control_path = ""  # the launcher's, for LAUNCHER_CHANNEL
        self.bridges = []  # type: List[threading.Event]  # set: all the launcher said is out
        self.host = ""  # the relay's TCP address, when it listens on TCP
        notice = spec.get("walltime_notice") or {}
        self.notice_text = str(notice.get("text") or "")
        self.notice_at = time.monotonic() + float(notice.get("after") or 0) if notice else None
        # A client through an OpenSSH master before 9.4 has no way to a Unix socket.
        if (spec.get("relay_transport") or transport) == "ipc":
            self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            path = os.path.join(runtime_dir, "relay")
            old_umask = os.umask(0o177)
            try:
                self.server.bind(path)
            finally:
                os.umask(old_umask)
            self.address = path  # type: Any
        else:
            # On a Slurm compute node the login node reaches the relay over the cluster
            # network ("relay_bind"): the relay admits no one who cannot prove the token.
            bind = str(spec.get("relay_bind") or "127.0.0.1")
            family, _, _, _, sockaddr = socket.getaddrinfo(
                bind, 0, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICSERV
            )[0]
            self.server = socket.socket(family, socket.SOCK_STREAM)
            self.server.bind(sockaddr)
            self.host = self.server.getsockname()[0]
            self.address = self.server.getsockname()[1]
        self.server.listen(64)
        self.server.setblocking(False)
        self.selector.register(self.server, self.read_event, self)
        self.running = True
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Stop within a second; every socket of the relay is closed then."""
        self.running = False

    # -- the loop ----------------------------------------------------------------------

    def run(self) -> None:
        try:
            self.serve()
        finally:
            for stream in list(self.streams.values()):
                self.end_stream(stream)
            for link in list(self.links):
                self.drop_link(link)
            self.selector.close()
            self.server.close()

    def serve(self) -> None:
        while self.running:
            wait = 1.0 if self.accept_resumes_at is None else ACCEPT_BACKOFF
            for key, mask in self.selector.select(timeout=wait):
                owner = key.data
                try:
                    if owner is self:
                        self.accept()
                    elif isinstance(owner, RelayLink):
                        if mask & self.write_event:
                            self.link_writable(owner)
                        if mask & self.read_event and owner in self.links:
                            self.link_readable(owner)
                    else:
                        if mask & self.write_event:
                            self.kernel_writable(owner)
                        if mask & self.read_event and owner.sid in self.streams:
                            self.kernel_readable(owner)
                except Exception as exc:  # one stream's fault must not end the others
                    log("relay: %s: %s" % (type(exc).__name__, exc))
                    if isinstance(owner, RelayLink):
                        self.drop_link(owner)
                    elif isinstance(owner, RelayStream):
                        self.end_stream(owner)
            self.expire(time.monotonic())

    def watch(self, sock: socket.socket, owner: Any, read: bool, write: bool) -> None:
        if sock.fileno() < 0:  # closed on the way here
            return
        events = (self.read_event if read else 0) | (self.write_event if write else 0)
        try:
            current = self.selector.get_key(sock).events
        except (KeyError, ValueError):
            current = None
        if not events:
            if current is not None:
                self.selector.unregister(sock)
        elif current is None:
            self.selector.register(sock, events, owner)
        elif current != events:
            self.selector.modify(sock, events, owner)

    def accept(self) -> None:
        try:
            sock, _ = self.server.accept()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                if self.accept_resumes_at is None:
                    log("relay: cannot accept a connection (%s); retrying" % exc.strerror)
                self.watch(self.server, self, False, False)
                self.accept_resumes_at = time.monotonic() + ACCEPT_BACKOFF
            return
        unproven = [link for link in self.links if link.phase != "open"]
        if len(unproven) >= self.unproven_max:
            # A flood: the oldest silent connection makes room (a real client speaks
            # within a round trip of connecting), else the oldest of all.
            silent = [link for link in unproven if link.phase == "hello" and not link.inbuf]
            self.drop_link(min(silent or unproven, key=lambda link: link.since))
        sock.setblocking(False)
        if sock.family == socket.AF_INET:  # small frames must not wait for an ACK (Nagle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = RelayLink(sock)
        self.links.add(link)
        self.watch(sock, link, True, False)

    def expire(self, now: float) -> None:
        if self.accept_resumes_at is not None and now >= self.accept_resumes_at:
            self.accept_resumes_at = None
            self.watch(self.server, self, True, False)
        if self.notice_at is not None and now >= self.notice_at:
            self.notice_at = None
            log(self.notice_text.strip())
            for stream in self.streams.values():
                if stream.cutter is not None:
                    self.queue_notice(stream, self.notice_text)
        for link in list(self.links):
            if link.phase != "open" and now - link.since > HANDSHAKE_TIMEOUT:
                self.drop_link(link)
        for stream in list(self.streams.values()):
            quiet = now - stream.progress_at > STALL_AFTER
            if stream.link is not None and stream.reading_paused and quiet:
                stream.stalled = True  # slow, or cut off: in_outage() tells which
                self.read_if_room(stream)
            if stream.link is None and now - stream.left_at > self.linger:
                log(
                    "relay: %s stream %s not resumed within %gs; closed"
                    % (stream.channel, stream.sid, self.linger)
                )
                self.end_stream(stream)

    # -- channels ----------------------------------------------------------------------

    def link_readable(self, link: RelayLink) -> None:
        data = receive(link.sock)
        if data is None:
            return
        if not data:
            self.drop_link(link)
            return
        link.inbuf += data
        if link.phase == "open":
            self.heard_at = time.monotonic()
        while link in self.links and link.phase != "open":
            end = link.inbuf.find(b"\n")
            if end < 0:
                if len(link.inbuf) > HANDSHAKE_LINE_MAX:
                    self.drop_link(link)
                return
            line = bytes(link.inbuf[:end])
            del link.inbuf[: end + 1]
            self.handshake(link, json.loads(line.decode()))
        if link in self.links and link.stream is not None:
            self.read_frames(link, link.stream)

    def handshake(self, link: RelayLink, message: Dict[str, Any]) -> None:
        if link.phase == "hello":
            channel = str(message.get("channel"))
            if not message.get("resume") and self.stream_count(channel) >= STREAMS_PER_CHANNEL_MAX:
                now = time.monotonic()
                if now - self.refusals_logged.get(channel, -60.0) >= 60.0:  # once a minute
                    self.refusals_logged[channel] = now
                    log(
                        "relay: refused a new %s connection: the kernel's %s port already "
                        "has %d streams (the most it relays)"
                        % (channel, channel, STREAMS_PER_CHANNEL_MAX)
                    )
                link.closing = True
                self.send_line(link, {"error": "too many %s connections" % channel})
                return
            link.hello = message
            link.nonce = os.urandom(16).hex()
            proof = prove(self.token, "relay", str(message["hello"]), link.nonce)
            self.send_line(link, {"nonce": link.nonce, "proof": proof})
            link.phase = "proof"
            return
        import hmac

        hello = link.hello
        expected = prove(self.token, "client", link.nonce, str(hello["hello"]))
        if not hmac.compare_digest(str(message.get("proof")), expected):
            log("relay: refused a connection that could not prove it knows the token")
            self.drop_link(link)
            return
        sid, channel = str(hello["stream"]), str(hello["channel"])
        if channel == LAUNCHER_CHANNEL:
            self.hand_to_launcher(link)
            return
        if hello.get("resume"):
            stream = self.streams.get(sid)
            if stream is None or stream.channel != channel:
                link.closing = True
                self.send_line(link, {"error": "no such stream here (ended or expired)"})
                return
            if stream.link is not None:
                self.drop_link(stream.link)
            self.send_line(
                link,
                {
                    "received": stream.received,
                    "dropped_messages": stream.dropped_messages,
                    "dropped_bytes": stream.dropped_bytes,
                },
            )
            stream.told = stream.received
            self.acknowledge(stream, int(hello.get("received") or 0))
        else:
            if sid in self.streams or channel not in self.endpoints:
                self.drop_link(link)
                return
            stream = RelayStream(sid, channel, self.connect_kernel(channel))
            self.streams[sid] = stream
            self.watch(stream.kernel, stream, True, False)
        link.phase = "open"
        link.stream = stream
        stream.link = link
        stream.framed = 0
        self.flush(stream)

    def hand_to_launcher(self, link: RelayLink) -> None:
        """From now on this channel carries raw bytes to and from the launcher's control
        socket, which runs its own challenge-response: the supervision channel of a
        client that holds no session (an OpenSSH master's sessions count against the
        server's MaxSessions, and it has no Unix-socket forwarding before 9.4)."""
        self.links.discard(link)
        self.watch(link.sock, link, False, False)
        if not self.control_path:
            link.sock.close()
            return
        args = (link.sock, self.control_path, bytes(link.outbuf), bytes(link.inbuf))
        passed_on = threading.Event()
        self.bridges.append(passed_on)
        threading.Thread(target=bridge, args=(*args, passed_on), daemon=True).start()

    def connect_kernel(self, channel: str) -> socket.socket:
        endpoint = self.endpoints[channel]
        if self.transport == "ipc":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(endpoint)
        else:
            sock = socket.create_connection(("127.0.0.1", endpoint), timeout=5)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        return sock

    def send_line(self, link: RelayLink, message: Dict[str, Any]) -> None:
        link.outbuf += (json.dumps(message) + "\n").encode()
        self.link_writable(link)

    def read_frames(self, link: RelayLink, stream: RelayStream) -> None:
        buffer = link.inbuf
        while len(buffer) >= FRAME_HEADER.size:
            kind, ack, size = FRAME_HEADER.unpack_from(buffer)
            end = FRAME_HEADER.size + size
            if len(buffer) < end:
                break
            payload = bytes(buffer[FRAME_HEADER.size : end])
            del buffer[:end]
            self.acknowledge(stream, ack)
            if kind == FRAME_DATA:
                stream.to_kernel += payload
                stream.received += size
                if stream.received - stream.told >= ACK_EVERY:
                    self.frame(link, stream, FRAME_ACK, b"")
            elif kind == FRAME_CLOSE:
                self.end_stream(stream)
                return
        if stream.to_kernel:
            self.kernel_writable(stream)
        # The kernel lags: leave the rest in the channel (SSH's window pushes back).
        self.watch(link.sock, link, len(stream.to_kernel) < TO_KERNEL_HIGH, bool(link.outbuf))

    def acknowledge(self, stream: RelayStream, received: int) -> None:
        confirmed = received - stream.acked
        if 0 < confirmed <= len(stream.unacked):
            del stream.unacked[:confirmed]
            stream.acked = received
            stream.framed = max(0, stream.framed - confirmed)
            stream.progress_at, stream.stalled = time.monotonic(), False
            self.at_limit.discard(stream.sid)
            self.read_if_room(stream)
            self.notice_dropped(stream)

    def frame(self, link: RelayLink, stream: RelayStream, kind: bytes, payload: bytes) -> None:
        link.outbuf += FRAME_HEADER.pack(kind, stream.received, len(payload))
        link.outbuf += payload
        stream.told = stream.received

    def flush(self, stream: RelayStream) -> None:
        """Frame what the link has not carried yet, as far as it takes it in."""
        link = stream.link
        if link is None or link.phase != "open":
            return
        while stream.framed < len(stream.unacked) and len(link.outbuf) < LINK_OUTPUT_HIGH:
            chunk = bytes(stream.unacked[stream.framed : stream.framed + FRAME_PAYLOAD_MAX])
            self.frame(link, stream, FRAME_DATA, chunk)
            stream.framed += len(chunk)
        if stream.kernel_eof and stream.framed == len(stream.unacked) and not stream.close_sent:
            self.frame(link, stream, FRAME_CLOSE, b"")
            stream.close_sent = True
        self.link_writable(link)

    def link_writable(self, link: RelayLink) -> None:
        if link not in self.links:
            return
        if link.outbuf and not send_from(link.sock, link.outbuf):
            self.drop_link(link)
            return
        stream = link.stream
        room = len(link.outbuf) < LINK_OUTPUT_HIGH
        if stream is not None and stream.link is link and stream.to_frame and room:
            self.flush(stream)  # frames more, and is back here
            return
        if link.closing and not link.outbuf:
            self.drop_link(link)
            return
        reading = stream is None or len(stream.to_kernel) < TO_KERNEL_HIGH
        self.watch(link.sock, link, reading, bool(link.outbuf))
        if stream is not None and stream.close_sent and not link.outbuf:
            self.end_stream(stream)

    def drop_link(self, link: RelayLink) -> None:
        if link not in self.links:
            return
        self.links.discard(link)
        self.watch(link.sock, link, False, False)
        link.sock.close()
        stream = link.stream
        if stream is not None and stream.link is link:
            stream.link = None
            stream.framed = 0
            stream.left_at = time.monotonic()
            self.read_if_room(stream)

    # -- the kernel's side -------------------------------------------------------------

    def kernel_readable(self, stream: RelayStream) -> None:
        data = receive(stream.kernel)
        if data is None:
            return
        if not data:
            stream.kernel_eof = True
            self.watch(stream.kernel, stream, False, False)
            self.flush(stream)
            if stream.link is None and not stream.unacked:
                self.end_stream(stream)
            return
        self.take_from_kernel(stream, data)
        if not self.room(stream):
            # The kernel's socket keeps what no one reads, to its high-water mark.
            if self.in_outage(stream) and stream.sid not in self.at_limit:
                self.at_limit.add(stream.sid)
                log(
                    "relay: %s stream %s paused: the launcher holds %d bytes for clients "
                    "that are away (outage_buffer %d and a quarter more for messages never "
                    "dropped); the kernel's socket keeps the rest, as for a slow client"
                    % (stream.channel, stream.sid, self.held(), self.bound)
                )
            stream.reading_paused = True
            stream.progress_at = time.monotonic()
            self.watch(stream.kernel, stream, False, bool(stream.to_kernel))
        self.flush(stream)

    def stream_count(self, channel: str) -> int:
        return sum(1 for stream in self.streams.values() if stream.channel == channel)

    def held(self) -> int:
        """What the streams together hold for their clients: the launcher's budget."""
        return sum(len(s.unacked) + len(s.undecided) for s in self.streams.values())

    def in_outage(self, stream: RelayStream) -> bool:
        """Is this stream's client cut off (not merely slow)?  Its channel is gone, or
        it confirmed nothing for STALL_AFTER and neither did any other client."""
        if stream.link is None:
            return True
        return stream.stalled and time.monotonic() - self.heard_at > STALL_AFTER

    def can_drop(self, stream: RelayStream) -> bool:
        return stream.cutter is not None and not stream.cutter.opaque

    def room(self, stream: RelayStream) -> bool:
        """May the relay read more of the kernel's output for this stream?"""
        mine = len(stream.unacked) + len(stream.undecided)
        if mine < FAIR_SHARE:
            return True
        if not self.in_outage(stream):
            return mine < IN_FLIGHT_MAX and self.held() < self.bound
        if self.can_drop(stream):  # past the budget output is dropped, the rest kept
            return self.held() < self.bound + self.headroom
        return self.held() < self.bound

    def read_if_room(self, stream: RelayStream) -> None:
        if stream.reading_paused and not stream.kernel_eof and self.room(stream):
            stream.reading_paused = False
            self.watch(stream.kernel, stream, True, bool(stream.to_kernel))

    def take_from_kernel(self, stream: RelayStream, data: bytes) -> None:
        """Past the bound, output messages (stream, display data) are dropped whole;
        every other message (status, replies' results, errors, comms) is kept."""
        cutter = stream.cutter
        if cutter is None or cutter.opaque:
            stream.unacked += data
            return
        outage = self.in_outage(stream)
        others = self.held() - len(stream.unacked) - len(stream.undecided) if outage else 0
        for segment, starts, _, ends in cutter.feed(data):
            if starts and outage and others + len(stream.unacked) >= self.bound:
                stream.deciding = True
            if stream.deciding:
                stream.undecided += segment
                kind = message_type(cutter.frames)
                if kind is None and not ends:
                    continue
                stream.deciding = False
                stream.dropping = kind in DROPPABLE_MESSAGES
                segment, stream.undecided = bytes(stream.undecided), bytearray()
                starts = not stream.dropping
            if starts and stream.dropped_messages and not stream.dropping:
                # before the next message kept (an `idle`, say), while it still counts
                self.add_notice(stream)
            if stream.dropping:
                stream.dropped_bytes += len(segment)
                if ends:
                    stream.dropped_messages += 1
                    stream.dropping = False
                    stream.parent = parent_of(cutter.frames)
                continue
            stream.unacked += segment
            if ends:
                if self.notice_text:  # only a kernel with a notice to come pays for this
                    self.message_kept(stream, cutter.frames)
                self.notice_dropped(stream)

    def message_kept(self, stream: RelayStream, frames: List[bytes]) -> None:
        """Follow the parent and the busy/idle status, and add waiting notices."""
        stream.last_parent = parent_of(frames)
        state = execution_state(frames)
        if state is not None:
            stream.busy = state == "busy"
            if stream.busy and stream.notice_for_next_cell:
                stream.notices.append(stream.notice_for_next_cell)
                stream.notice_for_next_cell = ""
        for text in stream.notices:
            stream.unacked += stream_notice(self.connection, stream.last_parent, text)
        stream.notices = []

    def queue_notice(self, stream: RelayStream, text: str) -> None:
        """``text`` in the output of the cell running now (if none, of the last one, and
        again in the next one: a client shows output only for a cell it runs)."""
        if not stream.busy:
            stream.notice_for_next_cell = text
        cutter = stream.cutter
        if cutter is not None and cutter.between_messages and not stream.deciding:
            stream.unacked += stream_notice(self.connection, stream.last_parent, text)
            self.flush(stream)
        else:
            stream.notices.append(text)

    def notice_dropped(self, stream: RelayStream) -> None:
        """Once there is room again, between two messages: tell the client's user."""
        cutter = stream.cutter
        if not stream.dropped_messages or cutter is None or not cutter.between_messages:
            return
        if self.held() < self.bound:
            self.add_notice(stream)
            self.flush(stream)

    def add_notice(self, stream: RelayStream) -> None:
        text = (
            "\n[ssh-provisioner] %d output message(s), %d bytes, were dropped while the "
            "link to this kernel's host was down (more than outage_buffer = %d bytes "
            "waited for the client).\n"
        ) % (stream.dropped_messages, stream.dropped_bytes, self.bound)
        log(text.strip())
        stream.unacked += stream_notice(self.connection, stream.parent, text)
        stream.dropped_messages = stream.dropped_bytes = 0

    def kernel_writable(self, stream: RelayStream) -> None:
        if self.streams.get(stream.sid) is not stream:
            return
        if stream.to_kernel and not send_from(stream.kernel, stream.to_kernel):
            self.end_stream(stream)
            return
        reading = not stream.kernel_eof and not stream.reading_paused
        self.watch(stream.kernel, stream, reading, bool(stream.to_kernel))
        link = stream.link
        if link is not None and link.phase == "open" and len(stream.to_kernel) < TO_KERNEL_HIGH:
            self.watch(link.sock, link, True, bool(link.outbuf))

    def end_stream(self, stream: RelayStream) -> None:
        if self.streams.get(stream.sid) is not stream:
            return
        del self.streams[stream.sid]
        self.at_limit.discard(stream.sid)
        self.watch(stream.kernel, stream, False, False)
        stream.kernel.close()
        if stream.link is not None:
            link, stream.link = stream.link, None
            link.closing = True
            self.link_writable(link)


def name_is_signal(name: Any) -> bool:
    return name is None or (
        isinstance(name, str) and name.startswith("SIG") and not name.startswith("SIG_")
    )


def on_terminate(supervisor: Supervisor) -> Any:
    def handler(signum: int, frame: Any) -> None:
        # Once: a second SIGTERM (Slurm sends one per step and per job at a time limit)
        # must not cut short the cleanup the first one started.
        for other in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(other, signal.SIG_IGN)
        supervisor.send(signal.SIGTERM)
        raise SystemExit(128 + signum)

    return handler


def prove(token: str, role: str, *nonces: str) -> str:
    """HMAC-SHA256 of the role and both nonces under the token: proof of knowing it."""
    import hashlib
    import hmac

    message = ":".join((role, *nonces)).encode()
    return hmac.new(token.encode(), message, hashlib.sha256).hexdigest()


def bridge(
    client: socket.socket,
    control_path: str,
    unsent: bytes,
    pending: bytes,
    passed_on: threading.Event,
) -> None:
    """Relay ``client`` to the control socket at ``control_path`` until either ends;
    ``passed_on`` is set once everything the control socket said has been sent."""
    client.setblocking(True)
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.sendall(unsent)
        control.connect(control_path)
        control.sendall(pending)
    except OSError:
        client.close()
        control.close()
        passed_on.set()
        return

    def pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            for data in iter(lambda: source.recv(65536), b""):
                sink.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    upstream = threading.Thread(target=pump, args=(client, control), daemon=True)
    upstream.start()
    pump(control, client)
    passed_on.set()
    upstream.join()
    client.close()
    control.close()


def attach(request: Dict[str, Any]) -> int:
    """Relay this SSH channel to a running launcher's control socket (reattach).  The
    relay knows no secret: the two ends authenticate each other through it."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(request["control"])
    except OSError as exc:
        emit({"event": "error", "reason": "gone", "message": "no launcher there: %s" % exc})
        return 4
    conn.sendall((json.dumps({"hello": str(request["hello"])}) + "\n").encode())

    def forward_stdin() -> None:
        for raw in iter(sys.stdin.buffer.readline, b""):
            conn.sendall(raw)
        conn.shutdown(socket.SHUT_WR)

    threading.Thread(target=forward_stdin, daemon=True).start()
    for data in iter(lambda: conn.recv(65536), b""):
        Client.write_stdout(data)
    return 0


def do_nothing() -> None:
    pass


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
    released = []  # type: List[bool]

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
    lines = queue.Queue()  # type: queue.Queue[str]
    threading.Thread(target=lambda: lines.put(sys.stdin.readline()), daemon=True).start()
    try:
        return lines.get(timeout=wait)
    except queue.Empty:
        return ""


def main() -> int:
    line = read_spec_line(float(sys.argv[1]) if len(sys.argv) > 1 else None)
    if not line:
        return NO_SPEC
    spec = json.loads(line)
    if "attach" in spec:
        return attach(spec["attach"])
    supervisor = Supervisor(spec)
    if spec.get("detach") == "in_place":
        supervisor.release_session = release_in_place
    elif spec.get("detach"):
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
            emit(supervisor.start())
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
        if supervisor.orphaned and spec.get("cancel_job_when_orphaned"):
            cancel_own_job()
    return status if status >= 0 else 128 - status


if __name__ == "__main__":
    sys.exit(main())
