from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence

import pytest

from ssh_provisioner import ProvisionerConfigError
from ssh_provisioner.hosts import HostEntry
from ssh_provisioner.placement import PlacementRequest, PlacementState
from ssh_provisioner.policies import (
    BUILTIN_POLICIES,
    HostPolicy,
    LeastLoad,
    MostFreeGpuMemory,
    Placement,
    PlacementView,
    load_policy,
    parse_gpus,
    parse_load,
)

HOSTS = [HostEntry.parse(name) for name in ("a", "b", "c")]


async def no_probe(entry: HostEntry, command: str) -> str | None:
    return None


def probes(outputs: dict[str, str | None]):  # type: ignore[no-untyped-def]
    async def prober(entry: HostEntry, command: str) -> str | None:
        return outputs.get(entry.name)

    return prober


async def place(state: PlacementState, policy: str, prober=no_probe, **request) -> str | None:  # type: ignore[no-untyped-def]
    placement, _ = await state.choose(
        PlacementRequest(list(request.pop("candidates", HOSTS)), load_policy(policy), **request),
        prober,
        probe_ttl=10,
    )
    return placement.entry.name if placement else None


def test_parse_load_and_gpus() -> None:
    assert parse_load("2.00 1.00 0.50 1/100 42\n4\n") == 0.5
    assert parse_load("garbage") is None
    assert parse_load(None) is None
    assert parse_load("1.0 1 1 1/1 1\n0\n") is None
    gpus = parse_gpus("100, 200, 5\n[N/A], 1, 1\n300, 400, [N/A]\n")
    assert [(g.index, g.free_mib, g.utilization) for g in gpus] == [(0, 100, 5), (2, 300, 0)]
    assert parse_gpus("") == []


async def test_round_robin_rotates_and_counts_reservations() -> None:
    state = PlacementState()
    assert [await place(state, "round-robin") for _ in range(6)] == list("abcabc")
    assert state.kernels(HOSTS[0]) == 2
    state.release(HOSTS[0])
    assert state.kernels(HOSTS[0]) == 1


async def test_concurrent_choices_never_double_book() -> None:
    state = PlacementState()
    limited = [HostEntry(h.host, max_kernels=8) for h in HOSTS]
    names = await asyncio.gather(
        *(place(state, "least-kernels", candidates=limited) for _ in range(25))
    )
    assert Counter(names) == {"a": 8, "b": 8, "c": 8, None: 1}


async def test_least_load_and_gpu_policies_use_probes() -> None:
    state = PlacementState()
    loads = {"a": "4.0 0 0 1/1 1\n2\n", "b": "1.0 0 0 1/1 1\n4\n", "c": None}
    assert await place(state, "least-load", probes(loads)) == "b"
    gpus = {"a": None, "b": "100, 1000, 0\n", "c": "50, 1000, 0\n900, 1000, 0\n"}
    placement, skipped = await PlacementState().choose(
        PlacementRequest(list(HOSTS), MostFreeGpuMemory()), probes(gpus), probe_ttl=10
    )
    assert placement == Placement(HOSTS[2], {"CUDA_VISIBLE_DEVICES": "1"})
    assert skipped == [("a", "ruled out by policy most-free-gpu-memory")]


async def test_probes_are_cached_and_shared() -> None:
    state = PlacementState()
    calls: Counter[str] = Counter()

    async def prober(entry: HostEntry, command: str) -> str | None:
        calls[entry.name] += 1
        await asyncio.sleep(0)
        return "1.0 0 0 1/1 1\n1\n"

    await asyncio.gather(*(place(state, "least-load", prober) for _ in range(5)))
    assert calls == {"a": 1, "b": 1, "c": 1}
    assert LeastLoad.probe_command == "cat /proc/loadavg && nproc"


async def test_unhealthy_hosts_are_passed_over_then_come_back() -> None:
    state = PlacementState()
    state.mark_unhealthy(HOSTS[0], "connection refused", cooldown=60)
    assert await place(state, "first-available") == "b"
    state.mark_unhealthy(HOSTS[1], "timeout", cooldown=60)
    placement, skipped = await state.choose(
        PlacementRequest(list(HOSTS), load_policy("first-available")), no_probe, 10
    )
    assert placement == Placement(HOSTS[2])
    assert skipped == [("a", "connection refused"), ("b", "timeout")]
    # with every host cooling down, they are tried anyway rather than refused unseen
    assert await place(state, "first-available", candidates=HOSTS[:2]) == "a"
    state.mark_unhealthy(HOSTS[0], "connection refused", cooldown=0)
    assert state.unhealthy_reason(HOSTS[0]) is None


async def test_restart_prefers_its_host_unless_it_cannot() -> None:
    state = PlacementState()
    assert await place(state, "round-robin", prefer=HOSTS[2]) == "c"
    state.mark_unhealthy(HOSTS[2], "down", cooldown=60)
    assert await place(state, "round-robin", prefer=HOSTS[2]) == "a"


def test_load_policy_errors() -> None:
    with pytest.raises(ProvisionerConfigError, match="available: first-available"):
        load_policy("fastest")
    with pytest.raises(ProvisionerConfigError, match="unknown"):
        load_policy("no_such_module:Policy")
    with pytest.raises(ProvisionerConfigError, match="not a HostPolicy"):
        load_policy("collections:Counter")
    assert set(BUILTIN_POLICIES) == {
        "round-robin",
        "random",
        "least-kernels",
        "least-load",
        "most-free-gpu-memory",
        "first-available",
    }


def test_dotted_path_policy() -> None:
    policy = load_policy("tests.unit.test_policies:Reverse")
    view: PlacementView = PlacementState()
    assert [p.entry.name for p in policy.rank(HOSTS, view)] == ["c", "b", "a"]


class Reverse(HostPolicy):
    name = "reverse"

    def rank(self, candidates: Sequence[HostEntry], view: PlacementView) -> list[Placement]:
        return [Placement(entry) for entry in reversed(candidates)]


@pytest.mark.parametrize(
    ("item", "problem"),
    [
        ({"host": "gpu1", "max_kernel": 2}, "unknown key 'max_kernel'"),
        ({"host": "gpu1", "max_kernels": 0}, "max_kernels must be a positive integer"),
        ({"host": "gpu1", "max_kernels": True}, "max_kernels must be a positive integer"),
        ({"host": "gpu1", "labels": "a100"}, "labels must be a list"),
        ({"host": "gpu1", "remote_python": 3}, "remote_python must be a str"),
        ({"host": "gpu1", "remote_transport": "udp"}, "remote_transport must be tcp or ipc"),
        ({"max_kernels": 2}, "has no 'host'"),
        (["gpu1"], "must be a string or a dict"),
        ({"host": "gpu1:0"}, "invalid port"),
    ],
)
def test_host_entry_errors(item: object, problem: str) -> None:
    with pytest.raises(ProvisionerConfigError, match=problem):
        HostEntry.parse(item)


def test_host_entry_overrides() -> None:
    entry = HostEntry.parse(
        {"host": "me@gpu2:2222", "remote_python": "/opt/py", "labels": ["a100"], "max_kernels": 4}
    )
    assert entry.name == "me@gpu2:2222"
    assert entry.override("remote_python", "python3") == "/opt/py"
    assert entry.override("remote_cwd", "~") == "~"
    assert entry.labels == {"a100"}
    assert entry.matches("gpu2")
    assert entry.matches("me@gpu2:2222")
    assert not entry.matches("gpu3")
