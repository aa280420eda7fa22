"""A real Slurm cluster for tests: Debian's munged, slurmctld and three slurmd "compute
nodes" (node1..node3, each in its own network, UTS and mount namespace, with two fake
GPUs), plus a login node (sshd in a namespace of its own, SLURM_CONF given by SetEnv).

Everything lives in one temp dir, and everything is stopped by PID: jobs are cancelled
first (slurmstepd outlives slurmd), then the daemons, then whatever is left in the
namespaces.  See ../shared/SLURM-FACTS.md for why each setting is what it is.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .sshd import SSHDaemon, start_sshd

DAEMONS = ("/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")
NODES = ("node1", "node2", "node3")
GPUS_PER_NODE = 2
CPUS_PER_NODE = 4
MEMORY_PER_NODE_MB = 4000
# Below the ephemeral range: a port of Slurm's must never be one a kernel or a test
# picked, and not Slurm's defaults (6817/6818), which a system instance may hold.  Each
# slurmd listens in its node's namespace; slurmctld listens in this one, on every
# address, so another checkout's cluster on this machine needs another port: the first
# free one from SLURMCTLD_PORTS, claimed under a lock until slurmctld holds it.
SLURMCTLD_PORTS = range(16817, 17817, 2)
SLURMD_PORT = 16818
_CONTROLLER_PORT_LOCK = "/run/lock/ssh-provisioner-tests-slurmctld.lock"


@contextlib.contextmanager
def _claimed_controller_port() -> Iterator[int]:
    with open(_CONTROLLER_PORT_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for port in SLURMCTLD_PORTS:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                try:
                    probe.bind(("0.0.0.0", port))  # as slurmctld binds
                except OSError:
                    continue
            yield port
            return
        raise RuntimeError(f"no free slurmctld port in {SLURMCTLD_PORTS}")


def slurm_missing_reason() -> str | None:
    missing = [path for path in DAEMONS if not os.access(path, os.X_OK)]
    missing += [name for name in CLIENTS if shutil.which(name) is None]
    if missing:
        return (
            f"Slurm is not installed ({', '.join(missing)} missing): "
            f"apt-get install slurmctld slurmd slurm-client munge (bash .ci/setup does)"
        )
    if os.geteuid() != 0:
        return "the Slurm tests run as root (they make network namespaces and run slurmd)"
    if shutil.which("nsenter") is None or shutil.which("unshare") is None:
        return "nsenter and unshare (util-linux) are needed for the Slurm rig"
    return None


def _run(*argv: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, **kwargs)  # type: ignore[call-overload, no-any-return]


def _ip(*args: str) -> None:
    result = _run("ip", *args)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def _netns_inode(name: str) -> int:
    return os.stat(f"/run/netns/{name}").st_ino


def pids_in_netns(namespace: str) -> list[int]:
    """Every process whose network namespace is ``namespace``."""
    inode = _netns_inode(namespace)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            if os.stat(f"/proc/{entry}/ns/net").st_ino == inode:
                found.append(int(entry))
    return found


@dataclass
class ComputeNode:
    name: str
    address: str
    namespace: str
    slurmd: subprocess.Popen[bytes] | None = None

    def processes(self) -> list[int]:
        """PIDs in the node's namespace other than its slurmd."""
        own = self.slurmd.pid if self.slurmd is not None else -1
        return [pid for pid in pids_in_netns(self.namespace) if pid != own]

    def wait_until_clean(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while left := self.processes():
            if time.monotonic() > deadline:
                lines = []
                for pid in left:
                    with contextlib.suppress(OSError):
                        lines.append(f"{pid}: {Path(f'/proc/{pid}/cmdline').read_bytes()!r}")
                raise AssertionError(f"left on {self.name}: {lines}")
            time.sleep(0.1)


@dataclass
class SlurmCluster:
    directory: Path
    conf: Path
    controller_address: str
    nodes: list[ComputeNode]
    login: SSHDaemon | None = None
    login_namespace: str = ""
    login_veth: str = ""  # the login node's link to the cluster network, to cut
    daemons: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def command(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """A Slurm client command run here (the controller's side), as root."""
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, env=self.env, check=False
        )

    def jobs(self) -> list[dict[str, str]]:
        """The queue: id, state, reason, node list, for every job squeue shows."""
        result = self.command("squeue", "-h", "-o", "%i|%T|%r|%N|%j")
        if result.returncode != 0:
            raise RuntimeError(f"squeue failed: {result.stderr.strip()}")
        rows = []
        for line in result.stdout.splitlines():
            job_id, state, reason, nodes, name = line.split("|", 4)
            rows.append(
                {"id": job_id, "state": state, "reason": reason, "nodes": nodes, "name": name}
            )
        return rows

    def job_field(self, job_id: str, name: str) -> str:
        """One field of ``scontrol show job``, e.g. JobState or Reason."""
        result = self.command("scontrol", "-o", "show", "job", job_id)
        for word in result.stdout.split():
            key, _, value = word.partition("=")
            if key == name:
                return value
        return ""

    def wait_queue_empty(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.jobs():
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs still queued after {timeout}s: {self.jobs()}")
            time.sleep(0.2)

    def cancel_all(self) -> None:
        self.command("scancel", "--full", "-u", "root")
        for row in self.jobs_or_empty():
            self.command("scancel", "--full", row["id"])

    def jobs_or_empty(self) -> list[dict[str, str]]:
        try:
            return self.jobs()
        except (RuntimeError, subprocess.TimeoutExpired):
            return []

    def node(self, name: str) -> ComputeNode:
        return next(node for node in self.nodes if node.name == name)

    # -- the controller, stopped and started again (a Slurm that stumbles) -------------

    def stop_controller(self) -> None:
        process = self.daemons.pop("slurmctld", None)
        if process is not None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def start_controller(self) -> None:
        self.daemons["slurmctld"] = _spawn(
            ["/usr/sbin/slurmctld", "-D", "-f", str(self.conf)], self.directory / "slurmctld.out"
        )
        _wait(lambda: self.command("scontrol", "ping").returncode == 0, 30, "slurmctld")


def _spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )


def _wait(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout}s")
        time.sleep(0.1)


def _write_conf(cluster: SlurmCluster, ports: tuple[int, int], munge_socket: Path) -> None:
    directory = cluster.directory
    controller_name = socket.gethostname().split(".")[0]
    node_lines = [
        f"NodeName={node.name} NodeAddr={node.address} CPUs={CPUS_PER_NODE} "
        f"RealMemory={MEMORY_PER_NODE_MB} Gres=gpu:{GPUS_PER_NODE} State=UNKNOWN"
        for node in cluster.nodes
    ]
    cluster.conf.write_text(
        "\n".join(
            [
                "ClusterName=sshp",
                f"SlurmctldHost={controller_name}({cluster.controller_address})",
                f"SlurmctldPort={ports[0]}",
                f"SlurmdPort={ports[1]}",
                "AuthType=auth/munge",
                "CredType=cred/munge",
                f"AuthInfo=socket={munge_socket}",
                "SlurmUser=root",
                "SlurmdUser=root",
                f"StateSaveLocation={directory / 'state'}",
                f"SlurmdSpoolDir={directory / 'spool-%n'}",
                f"SlurmctldPidFile={directory / 'slurmctld.pid'}",
                f"SlurmdPidFile={directory / 'slurmd-%n.pid'}",
                f"SlurmctldLogFile={directory / 'slurmctld.log'}",
                f"SlurmdLogFile={directory / 'slurmd-%n.log'}",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core",
                "GresTypes=gpu",
                "AccountingStorageType=accounting_storage/none",
                "JobCompType=jobcomp/none",
                "JobAcctGatherType=jobacct_gather/none",
                "SlurmdParameters=config_overrides",
                "MpiDefault=none",
                "ReturnToService=2",
                "SchedulerParameters=batch_sched_delay=0",
                "MinJobAge=300",
                "KillWait=5",
                "InactiveLimit=0",
                "SlurmdTimeout=30",
                *node_lines,
                f"PartitionName=gpu Nodes={','.join(n.name for n in cluster.nodes)} "
                "Default=YES MaxTime=INFINITE State=UP",
                "",
            ]
        )
    )
    devices = []
    for index, target in enumerate(("/dev/null", "/dev/zero")[:GPUS_PER_NODE]):
        device = directory / f"gpu{index}"
        device.symlink_to(target)
        devices.append(str(device))
    (directory / "gres.conf").write_text(
        f"NodeName={','.join(n.name for n in cluster.nodes)} Name=gpu File={','.join(devices)}\n"
    )


@contextlib.contextmanager
def running_cluster(directory: Path, authorized_keys: str) -> Iterator[SlurmCluster]:
    """Start the whole cluster; stop all of it, by PID, whatever happens."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)  # the login user's jobs read the config and the munge socket
    tag = uuid.uuid4().hex[:5]
    net = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(250)}"
    bridge = f"sshpbr{tag}"
    cluster = SlurmCluster(
        directory=directory,
        conf=directory / "slurm.conf",
        controller_address=f"{net}.1",
        nodes=[
            ComputeNode(name, f"{net}.{11 + i}", f"sshp-{tag}-{name}")
            for i, name in enumerate(NODES)
        ],
        login_namespace=f"sshp-{tag}-login",
    )
    namespaces = [node.namespace for node in cluster.nodes] + [cluster.login_namespace]
    veths: list[str] = []
    try:
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", f"{cluster.controller_address}/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        addresses = [node.address for node in cluster.nodes] + [f"{net}.5"]
        for index, (namespace, address) in enumerate(zip(namespaces, addresses, strict=False)):
            veth = f"sshp{tag}{index}"
            _ip("netns", "add", namespace)
            _ip("link", "add", veth, "type", "veth", "peer", "name", f"{veth}p")
            veths.append(veth)
            _ip("link", "set", f"{veth}p", "netns", namespace)
            _ip("link", "set", veth, "master", bridge)
            _ip("link", "set", veth, "up")
            _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", f"{veth}p")
            _ip("-n", namespace, "link", "set", f"{veth}p", "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
        cluster.login_veth = veths[-1]
        hosts = directory / "hosts"
        controller_name = socket.gethostname().split(".")[0]
        hosts.write_text(
            "127.0.0.1 localhost\n"
            f"{cluster.controller_address} {controller_name}\n"
            f"{net}.5 login\n" + "".join(f"{node.address} {node.name}\n" for node in cluster.nodes)
        )
        hosts.chmod(0o644)

        munge_dir = directory / "munge"
        munge_dir.mkdir(mode=0o755)
        key = munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        munge_socket = munge_dir / "munge.socket"
        (directory / "state").mkdir()
        with _claimed_controller_port() as controller_port:
            ports = (controller_port, SLURMD_PORT)
            _write_conf(cluster, ports, munge_socket)

            cluster.daemons["munged"] = _spawn(
                [
                    "/usr/sbin/munged", "-F", "--force", f"--key-file={key}",
                    f"--socket={munge_socket}", f"--pid-file={munge_dir / 'munged.pid'}",
                    f"--log-file={munge_dir / 'munged.log'}", f"--seed-file={munge_dir / 'seed'}",
                ],
                directory / "munged.out",
            )  # fmt: skip
            _wait(munge_socket.exists, 10, "munged")
            cluster.start_controller()
        for node in cluster.nodes:
            script = " && ".join(
                [
                    shlex.join(["hostname", node.name]),
                    shlex.join(["mount", "--bind", str(hosts), "/etc/hosts"]),
                    "exec "
                    + shlex.join(
                        ["/usr/sbin/slurmd", "-D", "-N", node.name, "-f", str(cluster.conf)]
                    ),
                ]
            )
            node.slurmd = _spawn(
                [
                    "nsenter", f"--net=/run/netns/{node.namespace}", "--",
                    "unshare", "--uts", "--mount", "--propagation", "private", "--",
                    "/bin/sh", "-c", script,
                ],
                directory / f"slurmd-{node.name}.out",
            )  # fmt: skip

        def nodes_idle() -> bool:
            result = cluster.command("sinfo", "-h", "-N", "-o", "%N %t")
            states = dict(line.split() for line in result.stdout.splitlines() if line.strip())
            return all(states.get(node.name) == "idle" for node in cluster.nodes)

        _wait(nodes_idle, 60, "the compute nodes")
        cluster.login = start_sshd(
            directory / "login",
            f"{net}.5",
            authorized_keys,
            hostname="login",
            bind_mounts={"/etc/hosts": hosts},
            set_env={"SLURM_CONF": str(cluster.conf)},
            netns=cluster.login_namespace,
        )
        yield cluster
    finally:
        _stop(cluster, namespaces, veths, bridge)


def _stop(cluster: SlurmCluster, namespaces: list[str], veths: list[str], bridge: str) -> None:
    if "slurmctld" in cluster.daemons:
        with contextlib.suppress(Exception):
            cluster.cancel_all()
            cluster.wait_queue_empty(30)
    if cluster.login is not None:
        cluster.login.stop()
    for node in cluster.nodes:
        if node.slurmd is not None:
            node.slurmd.terminate()
    for node in cluster.nodes:
        if node.slurmd is not None:
            try:
                node.slurmd.wait(timeout=10)
            except subprocess.TimeoutExpired:
                node.slurmd.kill()
                node.slurmd.wait()
    for name in ("slurmctld", "munged"):
        process = cluster.daemons.pop(name, None)
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    for namespace in namespaces:  # slurmstepd and its tasks outlive slurmd
        if os.path.exists(f"/run/netns/{namespace}"):
            for pid in pids_in_netns(namespace):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    for veth in veths:
        _run("ip", "link", "del", veth)
    _run("ip", "link", "del", bridge)
    for namespace in namespaces:
        _run("ip", "netns", "del", namespace)
    shutil.rmtree(cluster.directory, ignore_errors=True)
