"""A provisioner's side of the reserve (prespawn.py): the shelf of its kernelspec, made
from its options, and a start that takes a kernel from it.  Runs on the engine's loop.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import time
import uuid
from typing import TYPE_CHECKING, Any

import zmq

from .encryption import CurveKeys, negotiate
from .engine import get_engine
from .launch_plan import LaunchPlan, launch_spec, mapped_cwd, plan_launch
from .placement import PlacementRequest, Tries
from .policies import Placement
from .prespawn import Fit, Ready, Shelf
from .seat import KernelSeat
from .status import PRESPAWNED, board

if TYPE_CHECKING:
    from .provisioner import SSHProvisioner


def targets_of(provisioner: SSHProvisioner) -> dict[str | None, int]:
    """How many kernels to keep ready: where policy says (None), and per host entry."""
    targets: dict[str | None, int] = {None: provisioner.prespawn} if provisioner.prespawn else {}
    for entry in provisioner._entries:
        if entry.override("prespawn", 0):
            targets[entry.name] = entry.override("prespawn", 0)
    return targets


def shelf_key(provisioner: SSHProvisioner) -> str:
    spec = provisioner.kernel_spec
    return f"{getattr(provisioner.parent, 'kernel_name', '')}:{spec.resource_dir}"


def start_fit(provisioner: SSHProvisioner, argv: list[str], plan: LaunchPlan) -> Fit:
    """What this start sends to the host, as a reserve kernel's would be compared."""
    key, scheme, kernel_name = provisioner.keys.session_fields()
    del key
    return Fit.of(
        argv,
        plan.env,
        provisioner.choices,
        scheme=scheme,
        kernel_name=kernel_name,
        curve=provisioner.keys.curve is not None,
    )


async def make_shelf(provisioner: SSHProvisioner) -> Shelf:
    """The kernelspec's shelf, its kernels started as its plain start would be (the
    server's environment, default choices, no notebook folder): ``provisioner`` lends
    its options to every kernel the shelf spawns."""
    p = provisioner
    spec = p.kernel_spec
    argv = list(spec.argv)
    plan = await plan_launch(spec, dict(os.environ), argv, p.forward_env, None)
    choices = p._user_options.resolve({}, f"kernelspec {spec.display_name!r}")
    curve = negotiate(p.parent, None, spec.display_name) is not None
    _, scheme, kernel_name = p.keys.session_fields()
    fit = Fit.of(argv, plan.env, choices, scheme=scheme, kernel_name=kernel_name, curve=curve)

    async def spawn(pin: str | None) -> Ready:
        kernel_id = str(uuid.uuid4())  # its own until a start takes it (the board says)
        connection: dict[str, Any] = {
            "key": secrets.token_hex(32).encode(),  # its own: no two kernels share one
            "signature_scheme": scheme,
            "kernel_name": kernel_name,
        }
        if curve:
            public, secret = zmq.curve_keypair()
            connection.update(CurveKeys(public.decode(), secret.decode()).connection_fields())
        for_host = {**connection, "key": connection["key"].decode()}
        pinned = dataclasses.replace(plan, pinned_host=pin)
        seat = KernelSeat(kernel_id)
        request = PlacementRequest(p._hosts_for(pin, plan.labels), p._policy)
        tries = Tries(kernel_id, p.max_launch_attempts, p.host_cooldown, p._probe, p.probe_ttl)

        def spec_for(placement: Placement) -> dict[str, Any]:
            values = launch_spec(p, (kernel_id, spec), pinned, placement, for_host)
            return {**values, "kept_ready": True}

        board.post(
            kernel_id,
            kernelspec=kernel_name,
            display_name=spec.display_name,
            phase=PRESPAWNED,
            started=time.time(),
            choices=choices,
        )
        try:
            await seat.start(request, tries, lambda e: p._settings(e, kernel_id), spec_for)
        except BaseException:
            board.forget(kernel_id)
            raise
        if seat.placement is None:
            raise RuntimeError("a started seat has its placement")
        entry = seat.placement.entry
        return Ready(seat, connection, entry.name, mapped_cwd(p, entry, plan), pin)

    async def release(ready: Ready) -> None:
        await ready.seat.release(False, p.connect_options_for, p.pool_idle_timeout)

    name = spec.display_name
    return Shelf(name, fit, targets_of(p), p.prespawn_max_idle, spawn, release)


async def stock(provisioner: SSHProvisioner) -> Shelf:
    """The kernelspec's shelf, made (and filling) unless it is there already."""
    reserve = get_engine().reserve
    key = shelf_key(provisioner)
    shelf = reserve.shelves.get(key)
    if shelf is None:  # the kernelspec's first start here (or the server's own, at load)
        made = await make_shelf(provisioner)
        shelf = reserve.shelf(key, lambda: made)  # (unless another start made one meanwhile)
    return shelf


async def take(provisioner: SSHProvisioner, argv: list[str], plan: LaunchPlan) -> Ready | None:
    """A ready kernel this start fits, its seat now the provisioner's; else None (and
    the shelf, made on a kernelspec's first start, fills for the next ones)."""
    p = provisioner
    shelf = await stock(p)
    if shelf.fit != start_fit(p, argv, plan):
        return None
    hosts = {entry.name: entry for entry in p._hosts_for(plan.pinned_host, plan.labels)}

    def fits(ready: Ready) -> bool:
        entry = hosts.get(ready.host)
        return entry is not None and mapped_cwd(p, entry, plan) == ready.host_cwd

    ready = shelf.take(fits)
    if ready is not None:  # the seat is the kernel's from here, whatever its caller does
        old = ready.seat.kernel_id
        ready.seat.rename(str(p.kernel_id))
        p.seat = ready.seat
        if ready.seat.session is not None:
            ready.seat.session.taken()
        board.rename(old, str(p.kernel_id))
    return ready
