"""The reserve's own logic with a stand-in spawner (the real thing, over sshd, is
tests/integration/test_instant_kernels.py): targets, taking, expiry, a failed spawn."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from jupyter_client.kernelspec import KernelSpec

from ssh_provisioner import ProvisionerConfigError, SSHProvisioner, prespawn
from ssh_provisioner.prespawn import Fit, Ready, Shelf

from ..helpers import wait_until


class StandInSeat:
    def __init__(self, kernel_id: str) -> None:
        self.kernel_id = kernel_id
        self.session: Any = self
        self.ended = False

    def poll(self) -> int | None:
        return 0 if self.ended else None


class Spawner:
    def __init__(self) -> None:
        self.count = 0
        self.fail = False
        self.released: list[str] = []

    async def spawn(self, pin: str | None) -> Ready:
        await asyncio.sleep(0)
        if self.fail:
            raise OSError("host down")
        self.count += 1
        seat: Any = StandInSeat(f"k{self.count}")
        return Ready(seat, {"key": b"k"}, pin or "a", None, pin)

    async def release(self, ready: Ready) -> None:
        self.released.append(ready.seat.kernel_id)


def shelf(spawner: Spawner, targets: dict[str | None, int], max_idle: float = 60) -> Shelf:
    fit = Fit.of(["python"], {}, {}, scheme="hmac-sha256", kernel_name="k", curve=False)
    return Shelf("spec", fit, targets, max_idle, spawner.spawn, spawner.release)


async def settled() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def test_it_fills_each_target_and_refills_after_a_take() -> None:
    spawner = Spawner()
    reserve = shelf(spawner, {None: 2, "b": 1})
    reserve.fill()
    reserve.fill()  # spawns in flight count: no more than the targets
    await settled()
    assert sorted(r.pin or "" for r in reserve.ready) == ["", "", "b"]
    taken = reserve.take(lambda r: r.pin == "b")
    assert taken is not None
    assert taken.seat.kernel_id == "k3"
    await settled()
    assert spawner.count == 4
    assert [r.pin for r in reserve.ready].count("b") == 1
    await reserve.aclose()
    assert sorted(spawner.released) == ["k1", "k2", "k4"]  # not the taken one


async def test_a_dead_kernel_is_never_handed_out() -> None:
    spawner = Spawner()
    reserve = shelf(spawner, {None: 1})
    reserve.fill()
    await settled()
    reserve.ready[0].seat.ended = True  # type: ignore[attr-defined]
    assert reserve.take(lambda r: True) is None
    await settled()
    assert spawner.released == ["k1"]
    assert [r.seat.kernel_id for r in reserve.ready] == ["k2"]
    await reserve.aclose()


async def test_an_idle_kernel_is_replaced() -> None:
    spawner = Spawner()
    reserve = shelf(spawner, {None: 1}, max_idle=0.05)
    reserve.fill()
    await settled()
    await wait_until(lambda: spawner.released == ["k1"], 5, "the idle kernel ended")
    await settled()
    assert [r.seat.kernel_id for r in reserve.ready] == ["k2"]
    await reserve.aclose()


async def test_a_failed_spawn_rests_before_the_next(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prespawn, "RETRY_AFTER_FAILURE", 0.05)
    spawner = Spawner()
    spawner.fail = True
    reserve = shelf(spawner, {None: 1})
    reserve.fill()
    await settled()
    reserve.fill()  # resting: nothing
    assert not reserve.ready
    spawner.fail = False
    await wait_until(lambda: bool(reserve.ready), 5, "a kernel after the rest")
    await reserve.aclose()


def test_what_fits_ignores_the_session_name_and_the_host_choice() -> None:
    def fit(env: dict[str, str], choices: dict[str, Any]) -> Fit:
        return Fit.of(["python"], env, choices, scheme="s", kernel_name="k", curve=False)

    assert fit({"JPY_SESSION_NAME": "a.ipynb"}, {"host": "a"}) == fit({}, {})
    assert fit({"KERNEL_X": "1"}, {}) != fit({}, {})
    assert fit({}, {"gpus": 1}) != fit({}, {"gpus": 2})


@pytest.mark.parametrize(
    ("config", "said"),
    [
        ({"hosts": ["login"], "slurm": {"partition": "gpu"}, "prespawn": 1}, "not with 'slurm'"),
        ({"hosts": [{"host": "a", "prespawn": -1}]}, "prespawn must be an integer, 0 or more"),
        ({"hosts": [{"host": "a", "prespawn": True}]}, "prespawn must be an integer"),
        ({"hosts": ["a"], "prespawn": -2}, "prespawn"),
    ],
)
def test_a_prespawn_it_cannot_keep_is_refused(config: dict[str, Any], said: str) -> None:
    spec = KernelSpec(argv=["python3"], display_name="Remote", language="python")
    with pytest.raises(ProvisionerConfigError, match=said):
        SSHProvisioner(kernel_spec=spec, kernel_id="x", **config)
