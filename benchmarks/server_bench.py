"""Jupyter Server: POST /api/sessions -> first execute_result over the websocket.

    .venv/bin/python -m benchmarks.server_bench [--rounds N] [--login USER]

What a JupyterLab user waits for when opening a notebook and running its first cell,
through a real `jupyter server`: create the session (the kernel starts), open the
kernel's websocket, execute `6 * 7`, receive its execute_result.  The baseline is a
local kernelspec with the same argv, measured in the same run and the same server,
interleaved with the remote ones:
- ssh, pooled: the server already holds a connection to the host (a kernel was
  started there before, within pool_idle_timeout): the everyday case;
- ssh, cold: a new SSH connection for every start (pool_idle_timeout 0).
Target: ssh <= 1.15x local.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ssh_provisioner.throwaway import generate_key, running_sshd
from tests.e2e.jupyter_server import Server, start_server

ARGV = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
SERIES = {"local": "local kernelspec", "ssh": "ssh, pooled", "ssh-cold": "ssh, cold"}


def write_specs(jupyter_path: Path, pooled: dict[str, Any], cold: dict[str, Any]) -> None:
    configs: dict[str, dict[str, Any] | None] = {
        "local": None,
        "ssh": {**pooled, "pool_idle_timeout": 600},
        "ssh-cold": {**cold, "pool_idle_timeout": 0},
    }
    for name, config in configs.items():
        metadata = {}
        if config is not None:
            provisioner = {"provisioner_name": "ssh-provisioner", "config": config}
            metadata["kernel_provisioner"] = provisioner
        directory = jupyter_path / "kernels" / name
        directory.mkdir(parents=True)
        spec = {"argv": ARGV, "display_name": name, "language": "python", "metadata": metadata}
        (directory / "kernel.json").write_text(json.dumps(spec))


async def first_result(server: Server, kernel_name: str, index: int) -> float:
    """Seconds from POST /api/sessions to the first execute_result on the websocket."""
    started = time.perf_counter()
    session = await server.request(
        "POST", "/api/sessions",
        {"path": f"bench-{index}.ipynb", "type": "notebook", "kernel": {"name": kernel_name}},
    )  # fmt: skip
    try:
        channels = await server.channels(session["kernel"]["id"])
        try:
            msg_id = channels.execute("6 * 7")
            while True:
                message = await channels.receive(timeout=60)
                if (
                    message["msg_type"] == "execute_result"
                    and message["parent_header"].get("msg_id") == msg_id
                ):
                    elapsed = time.perf_counter() - started
                    assert message["content"]["data"]["text/plain"] == "42"
                    return elapsed
        finally:
            channels.close()
    finally:
        await server.request("DELETE", f"/api/sessions/{session['id']}")


async def run_rounds(server: Server, rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in SERIES}
    for name in SERIES:  # warm imports, the server's handlers and the pooled connection
        await first_result(server, name, 0)
    for index in range(1, rounds + 1):  # interleaved, so drift hits every series alike
        for name in SERIES:
            times[name].append(await first_result(server, name, index))
    return times


def measure(rounds: int, login: str) -> None:
    with tempfile.TemporaryDirectory(prefix="sshp-server-bench-") as tmp:
        directory = Path(tmp)
        directory.chmod(0o755)
        key = directory / "client_ed25519"
        public = generate_key(key)
        # two hosts: one connection a pooled series keeps, one the cold series drops
        with (
            running_sshd(directory / "pooled", "127.0.0.2", public + "\n") as pooled,
            running_sshd(directory / "cold", "127.0.0.3", public + "\n") as cold,
        ):
            known_hosts = directory / "known_hosts"
            known_hosts.write_text(
                pooled.known_hosts_line() + "\n" + cold.known_hosts_line() + "\n"
            )
            config = {
                "connect_options": {
                    "client_keys": [str(key)],
                    "known_hosts": str(known_hosts),
                    "config": [],
                    "agent_path": "",
                },
                "remote_python": sys.executable,
            }
            jupyter_path = directory / "share" / "jupyter"
            write_specs(
                jupyter_path,
                {**config, "hosts": [pooled.destination(login)]},
                {**config, "hosts": [cold.destination(login)]},
            )
            server = start_server(directory, jupyter_path, log_level="WARN")
            try:
                times = asyncio.run(run_rounds(server, rounds))
            finally:
                server.stop()
    print(f"Jupyter Server: POST /api/sessions -> first execute_result ({rounds} rounds, {login})")
    base = statistics.median(times["local"])
    for name, label in SERIES.items():
        value = statistics.median(times[name])
        ratio = "baseline" if name == "local" else f"{value / base:.2f}x  (target <= 1.15x)"
        print(f"  {label:<17} {value * 1000:7.1f} ms   {ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="measurements per series")
    parser.add_argument("--login", default=getpass.getuser(), help="user to log in as")
    args = parser.parse_args()
    measure(args.rounds, args.login)


if __name__ == "__main__":
    main()
