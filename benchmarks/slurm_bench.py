"""A Slurm kernel's start against the scheduler's own floor, measured in one run.

    .venv/bin/python -m benchmarks.slurm_bench [--rounds N]

On a real Slurm (Debian's slurmctld, three slurmd nodes in namespaces, a login node
running sshd; tests/slurm.py builds it), as root:
- floor: `sbatch --wrap hostname` over one SSH connection to the login node, submit
  to completion (watched every 50 ms): the least any job costs on this cluster;
- local: a LocalProvisioner kernel's start -> first kernel_info reply;
- slurm: a Slurm kernel's start -> first kernel_info reply (its job submitted, queued,
  its launcher in a step on a compute node, the channels through the login node),
  with the login node's connection pooled (warm) as a server's would be;
- the queue's part of the Slurm start, reported apart.
Target: slurm <= 1.3 x floor + local.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from jupyter_client.kernelspec import KernelSpecManager

from ssh_provisioner.throwaway import generate_key

from .bench import kernel
from .rig import main, write_kernelspecs


async def floor(
    destination: tuple[str, int], options: dict[str, object], rounds: int
) -> list[float]:
    """Submit `hostname` and watch the job to its end (every 50 ms, over the same
    connection): the scheduler's round trip, with no client-side polling delay."""
    import asyncssh  # after ssh_provisioner, which quiets its DSA warning

    host, port = destination
    times = []
    async with asyncssh.connect(host, port, **options) as connection:  # type: ignore[arg-type]
        for _ in range(rounds):
            started = time.perf_counter()
            submitted = await connection.run(
                "sbatch --parsable --output=/dev/null --wrap hostname", check=True
            )
            job = str(submitted.stdout).strip()
            while True:
                shown = await connection.run(f"scontrol -o show job {job}")
                if "JobState=COMPLETED" in str(shown.stdout):
                    break
                assert "JobState=" in str(shown.stdout), shown.stderr
                await asyncio.sleep(0.05)
            times.append(time.perf_counter() - started)
    return times


async def starts(ksm: KernelSpecManager, rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"local": [], "slurm": [], "queue": []}
    for name in ("local", "slurm"):  # warm the imports and the pooled connection
        async with kernel(ksm, name):
            pass
    for _ in range(rounds):
        async with kernel(ksm, "local", times["local"]):
            pass
        async with kernel(ksm, "slurm", times["slurm"]) as kc:
            job = kc.parent.provisioner.seat.job  # type: ignore[union-attr]
            times["queue"].append(job.queue_wait or 0.0)
    return times


def measure(rounds: int, login: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.slurm import running_cluster, slurm_missing_reason

    reason = slurm_missing_reason()
    if reason:
        raise SystemExit(reason)
    with tempfile.TemporaryDirectory(prefix="sshp-slurm-bench-") as directory:
        root = Path(directory)
        root.chmod(0o755)
        key = root / "client_ed25519"
        public = generate_key(key)
        with running_cluster(root / "cluster", public + "\n") as cluster:
            login_node = cluster.login
            assert login_node is not None
            options = {
                "client_keys": [str(key)],
                "known_hosts": str(login_node.known_hosts),
                "config": [],
                "agent_path": "",
            }
            config = {
                "hosts": [login_node.destination("root")],
                "connect_options": options,
                "remote_python": sys.executable,
                "pool_idle_timeout": 600,
                "slurm": {"partition": "gpu", "time": "00:10:00"},
            }
            write_kernelspecs(root / "kernels", {"local": None, "slurm": config})
            ksm = KernelSpecManager(kernel_dirs=[str(root / "kernels")])
            destination = (login_node.address, login_node.port)
            floors = asyncio.run(floor(destination, {**options, "username": "root"}, rounds))
            times = asyncio.run(starts(ksm, rounds))
            cluster.wait_queue_empty(60)
    report(floors, times)


def report(floors: list[float], times: dict[str, list[float]]) -> None:
    base, local = statistics.median(floors), statistics.median(times["local"])
    slurm, queue = statistics.median(times["slurm"]), statistics.median(times["queue"])
    target = 1.3 * base + local
    print(f"Slurm kernel start -> first kernel_info, median of {len(floors)} (seconds)")
    print(f"  floor: sbatch --wrap hostname, to its end {base:6.2f}")
    print(f"  local kernel start                        {local:6.2f}")
    print(f"  Slurm kernel start                        {slurm:6.2f}")
    print(f"    of which in the queue                   {queue:6.2f}")
    print(f"    without the queue                       {slurm - queue:6.2f}")
    print(
        f"  slurm / (floor + local) = {slurm / (base + local):.2f}x;  "
        f"target slurm <= 1.3 x floor + local = {target:.2f}s: "
        f"{'met' if slurm <= target else 'MISSED'}"
    )


if __name__ == "__main__":
    main(__doc__ or "", measure)
