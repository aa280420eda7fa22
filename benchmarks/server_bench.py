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

import asyncio
import statistics
import time

from tests.e2e.jupyter_server import Server, start_server

from .rig import loopback_hosts, main, write_kernelspecs

SERIES = {"local": "local kernelspec", "ssh": "ssh, pooled", "ssh-cold": "ssh, cold"}


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
    # two hosts: one connection the pooled series keeps, one the cold series drops
    with loopback_hosts(2, login) as rig:
        pooled, cold = rig.hosts
        jupyter_path = rig.directory / "share" / "jupyter"
        write_kernelspecs(
            jupyter_path / "kernels",
            {
                "local": None,
                "ssh": rig.config(pooled, pool_idle_timeout=600),
                "ssh-cold": rig.config(cold, pool_idle_timeout=0),
            },
        )
        server = start_server(rig.directory, jupyter_path, log_level="WARN")
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


if __name__ == "__main__":
    main(__doc__, measure)
