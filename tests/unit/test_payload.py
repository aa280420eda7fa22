"""The payload a host runs: each entry ships what it imports and nothing more, and it
runs on every host Python with tracebacks that name the real module and line."""

from __future__ import annotations

import json
import subprocess

import pytest

from ssh_provisioner.payload import BOOTSTRAP, ENTRIES, LAUNCHER_BEGINS, modules_for, payload_line

from ..kit import HOST_PYTHONS, host_python


def test_a_reattach_ships_neither_the_supervisor_nor_the_relay() -> None:
    assert modules_for("reattach") == ["output", "wire", "reattach"]
    launch = modules_for("launch")
    assert {"supervisor", "relay", "holding", "spec", "wire"} <= set(launch)
    assert launch[-1] == "main"
    for entry in ENTRIES:  # every module after the ones it imports
        order = modules_for(entry)
        for position, module in enumerate(order):
            assert set(imported_by(module)) <= set(order[:position]), (entry, module)


def imported_by(module: str) -> list[str]:
    from ssh_provisioner.payload import _imports

    return _imports(module)


@pytest.mark.parametrize("minor", HOST_PYTHONS)
def test_the_payload_runs_on_each_host_python_and_names_its_lines(minor: str) -> None:
    python, _ = host_python(minor)
    spec = json.dumps({"argv": ["x"], "kernel_id": "k", "attach_token": "t", "bogus": 1})
    ran = subprocess.run(
        [python, "-I", "-S", "-c", BOOTSTRAP, "5"],
        input=payload_line("launch") + spec.encode() + b"\n",
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert ran.stdout.decode() == f"\n{LAUNCHER_BEGINS}\n"
    stderr = ran.stderr.decode()
    assert ran.returncode == 1, stderr
    assert 'File "ssh_provisioner/host/spec.py", line' in stderr
    assert 'raise SpecError("unknown launch spec key(s)' in stderr  # the source line, too
    assert "unknown launch spec key(s): bogus" in stderr
