"""Jupyter Server: POST /api/sessions -> first execute_result over the websocket.

    .venv/bin/python -m benchmarks.server_bench [--rounds N] [--login USER]

What a JupyterLab user waits for when opening a notebook and running its first cell,
through a real `jupyter server`: create the session (the kernel starts), open the
kernel's websocket, execute `6 * 7`, receive its execute_result.  The baseline is a
local kernelspec with the same argv, measured in the same run and the same server,
interleaved with the remote ones:
- ssh, pooled: the server already holds a connection to the host (a kernel was
  started there before, within pool_idle_timeout): the everyday case;
- ssh, cold: a new SSH connection for every start (pool_idle_timeout 0);
- ssh, instant: a kernelspec with ``prespawn: 1``: the server keeps a kernel ready,
  and each series starts once the next one is (the wait is not timed).
Targets: ssh <= 1.15x local; instant <= 0.5x local.
"""

from __future__ import annotations

import asyncio
import statistics
import time

from tests.e2e.jupyter_server import Server, metrics, start_server

from .rig import loopback_hosts, main, write_kernelspecs

SERIES = {
    "local": "local kernelspec",
    "ssh": "ssh, pooled",
    "ssh-cold": "ssh, cold",
    "ssh-instant": "ssh, instant",
}
TARGETS = {"ssh": 1.15, "ssh-cold": 1.15, "ssh-instant": 0.5}
READY = 'ssh_provisioner_kernels{{host="{}",phase="prespawned"}}'


async def kernel_ready(server: Server, host: str, timeout: float = 120) -> None:
    """Until the server keeps a kernel ready on ``host`` (its /metrics say so)."""
    deadline = time.monotonic() + timeout
    while (await metrics(server)).get(READY.format(host), 0) < 1:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no kernel kept ready on {host} after {timeout}s")
        await asyncio.sleep(0.1)


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


async def run_rounds(server: Server, rounds: int, host: str) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in SERIES}
    for name in SERIES:  # warm imports, the server's handlers and the pooled connection
        await first_result(server, name, 0)
    for index in range(1, rounds + 1):  # interleaved, so drift hits every series alike
        for name in SERIES:
            if name == "ssh-instant":
                await kernel_ready(server, host)
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
                "ssh-instant": rig.config(pooled, pool_idle_timeout=600, prespawn=1),
            },
        )
        server = start_server(rig.directory, jupyter_path, log_level="WARN")
        try:
            times = asyncio.run(run_rounds(server, rounds, pooled.destination(login)))
        finally:
            server.stop()
    print(f"Jupyter Server: POST /api/sessions -> first execute_result ({rounds} rounds, {login})")
    base = statistics.median(times["local"])
    for name, label in SERIES.items():
        value = statistics.median(times[name])
        target = TARGETS.get(name)
        ratio = f"{value / base:.2f}x  (target <= {target}x)" if target else "baseline"
        print(f"  {label:<17} {value * 1000:7.1f} ms   {ratio}")


if __name__ == "__main__":
    main(__doc__, measure)
