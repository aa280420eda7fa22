"""Jupyter Server's event-loop lag while 8 kernels stream output: remote vs local.

    .venv/bin/python -m benchmarks.loop_lag [--rounds N] [--login USER]

A real `jupyter server` loads this module as a server extension, which wakes every
10 ms on the server's own loop and records how late it woke (GET /loop-lag returns the
samples since the last call).  Eight kernels then print 500 lines each, one message
every 10 ms (800 a second in all, under the server's IOPub rate limit), relayed to
eight websocket clients; the same eight kernels run local (the baseline) and remote
over ssh-provisioner, alternating, in one run.
The figure: p50 and p99 of the lag, remote against local.  With the SSH engine on a
thread of its own, the server's loop relays websocket traffic, as for a local kernel,
and no SSH byte.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from tornado.web import RequestHandler

from tests.e2e.jupyter_server import Channels, Server, start_server

from .rig import loopback_hosts, main, write_kernelspecs

KERNELS = 8
LINES = 500  # 100 a second: 8 kernels stay under Jupyter Server's IOPub rate limit
INTERVAL = 0.010
STREAM = (
    "import time\n"
    f"for i in range({LINES}):\n"
    "    print('line', i, 'x' * 60, flush=True)\n"
    "    time.sleep(0.01)"
)

# -- the server extension (runs inside jupyter server) -----------------------------------

_samples: list[float] = []


async def _sample_lag() -> None:
    loop = asyncio.get_running_loop()
    while True:
        expected = loop.time() + INTERVAL
        await asyncio.sleep(INTERVAL)
        _samples.append(max(0.0, loop.time() - expected))


class LagHandler(RequestHandler):  # type: ignore[misc]
    def get(self) -> None:
        taken = list(_samples)
        _samples.clear()
        self.finish(json.dumps(taken))


_pauses: list[tuple[int, float]] = []  # (generation, seconds) of each collection
_collecting: dict[str, float] = {}


def _time_collections(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _collecting["since"] = time.perf_counter()
    elif "since" in _collecting:
        _pauses.append((info["generation"], time.perf_counter() - _collecting.pop("since")))


class CollectionsHandler(RequestHandler):  # type: ignore[misc]
    """GET /gc-pauses: the garbage collector's pauses since the last call."""

    def get(self) -> None:
        taken = list(_pauses)
        _pauses.clear()
        self.finish(json.dumps(taken))


class SwitchHandler(RequestHandler):  # type: ignore[misc]
    """GET /switch-interval?seconds=S: the interpreter's GIL switch interval, set."""

    def get(self) -> None:
        seconds = self.get_argument("seconds", "")
        if seconds:
            sys.setswitchinterval(float(seconds))
        self.finish(json.dumps(sys.getswitchinterval()))


_tasks: set[asyncio.Task[None]] = set()


def _load_jupyter_server_extension(serverapp: Any) -> None:
    serverapp.web_app.add_handlers(
        ".*$",
        [
            ("/loop-lag", LagHandler),
            ("/switch-interval", SwitchHandler),
            ("/gc-pauses", CollectionsHandler),
        ],
    )
    gc.callbacks.append(_time_collections)
    task = asyncio.get_event_loop().create_task(_sample_lag())
    _tasks.add(task)


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "benchmarks.loop_lag"}]


# -- the benchmark ------------------------------------------------------------------


async def lag_samples(server: Server) -> list[float]:
    response = await server.http.fetch(
        f"{server.url}/loop-lag", headers={"Authorization": f"token {server.token}"}
    )
    samples: list[float] = json.loads(response.body)
    return samples


async def stream_round(server: Server, kernel_name: str) -> list[float]:
    """Lag samples while KERNELS kernels of ``kernel_name`` stream LINES lines each."""
    kernels = [
        await server.request("POST", "/api/kernels", {"name": kernel_name}) for _ in range(KERNELS)
    ]
    channels: list[Channels] = []
    try:
        channels = [await server.channels(k["id"]) for k in kernels]
        for ch in channels:  # ready: one round trip each
            await ch.collect(ch.execute("1"), timeout=60)
        await lag_samples(server)  # drop what came before the streams
        msg_ids = [ch.execute(STREAM) for ch in channels]
        await asyncio.gather(
            *(ch.collect(msg_id, timeout=120) for ch, msg_id in zip(channels, msg_ids, strict=True))
        )
        return await lag_samples(server)
    finally:
        for ch in channels:
            ch.close()
        for k in kernels:
            await server.request("DELETE", f"/api/kernels/{k['id']}")


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def switch_interval(server: Server, seconds: float | None = None) -> float:
    query = f"?seconds={seconds}" if seconds is not None else ""
    response = await server.http.fetch(
        f"{server.url}/switch-interval{query}", headers={"Authorization": f"token {server.token}"}
    )
    value: float = json.loads(response.body)
    return value


# series: (kernelspec, the server's GIL switch interval; None: as the server has it)
SERIES = {"local": ("local", None), "ssh": ("ssh", None), "ssh, 1 ms": ("ssh", 0.001)}


async def run_rounds(server: Server, rounds: int) -> dict[str, list[float]]:
    """Alternating, so drift hits every series alike.  "ssh, 1 ms": the same with the
    server's GIL switch interval at 1 ms (Python's default is 5)."""
    samples: dict[str, list[float]] = {name: [] for name in SERIES}
    chosen = await switch_interval(server)
    print(f"the server's GIL switch interval: {chosen * 1000:g} ms")
    for _ in range(rounds):
        for name, (kernel, interval) in SERIES.items():
            await switch_interval(server, interval or chosen)
            samples[name] += await stream_round(server, kernel)
    return samples


def pin(pid: int, cpu: int) -> None:
    """Every thread of ``pid`` (and what it starts from now on) on core ``cpu``."""
    subprocess.run(
        ["taskset", "-a", "-p", "-c", str(cpu), str(pid)], check=True, capture_output=True
    )


def measure(rounds: int, login: str) -> None:
    # SSHP_BENCH_PINNED=1: the server alone on core 0, everything else (its kernels,
    # sshd and the launchers, this client) on core 1, as if the hosts were other
    # machines: the lag is then the server process's own (its loop and the engine's
    # share of the GIL), not the sharing of two cores with the "hosts".
    pinned = os.environ.get("SSHP_BENCH_PINNED") == "1"
    with loopback_hosts(1, login) as rig:
        jupyter_path = rig.directory / "share" / "jupyter"
        write_kernelspecs(
            jupyter_path / "kernels",
            {"local": None, "ssh": rig.config(pool_idle_timeout=600)},
        )
        if pinned:
            os.sched_setaffinity(0, {1})
            pin(rig.hosts[0].process.pid, 1)
            spec_path = jupyter_path / "kernels" / "local" / "kernel.json"
            spec = json.loads(spec_path.read_text())
            spec["argv"] = ["taskset", "-c", "1", *spec["argv"]]
            spec_path.write_text(json.dumps(spec))
        config_dir = rig.directory / "config"  # start_server's JUPYTER_CONFIG_DIR
        config_dir.mkdir()
        enable = {"ServerApp": {"jpserver_extensions": {"benchmarks.loop_lag": True}}}
        (config_dir / "jupyter_server_config.json").write_text(json.dumps(enable))
        server = start_server(rig.directory, jupyter_path, log_level="WARN")
        if pinned:
            pin(server.process.pid, 0)
        started = time.monotonic()
        try:
            samples = asyncio.run(run_rounds(server, rounds))
        except Exception:
            print(server.log()[-6000:])
            raise
        finally:
            server.stop()
    print(
        f"{'pinned (the server alone on core 0); ' if pinned else ''}"
        f"Jupyter Server loop lag, sampled every {INTERVAL * 1000:g} ms, while {KERNELS} "
        f"kernels print {LINES} lines each, one message a line, 100 a second "
        f"({rounds} rounds, {login}, {time.monotonic() - started:.0f} s)"
    )
    base50 = statistics.median(samples["local"])
    base99 = percentile(samples["local"], 0.99)
    for name, values in samples.items():
        p50, p99 = statistics.median(values), percentile(values, 0.99)
        ratio = "baseline" if name == "local" else f"{p50 / base50:.2f}x / {p99 / base99:.2f}x"
        print(
            f"  {name:<10} p50 {p50 * 1000:6.2f} ms  p99 {p99 * 1000:6.2f} ms  "
            f"({len(values)} samples)  {ratio}"
        )


if __name__ == "__main__":
    main(__doc__, measure)
