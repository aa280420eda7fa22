"""The launch spec's one definition: what the provisioner builds is what the launcher
reads, every key typed and defaulted once."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ssh_provisioner.host.spec import FIELDS, REQUIRED, LaunchSpec, SpecError

MINIMAL: dict[str, Any] = {
    "argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
    "connection": {"key": "k"},
    "kernel_id": "0123",
    "attach_token": "t",
}


def test_every_default_is_filled_in_and_survives_the_line() -> None:
    spec = LaunchSpec(MINIMAL)
    assert set(spec.values) == {key for key, _, _ in FIELDS}
    again = LaunchSpec.from_line(spec.to_line().decode())
    assert again.values == spec.values
    assert again.stream_linger == 120
    assert again.detach is False
    assert again.cwd is None


def test_every_field_is_an_attribute_mypy_knows() -> None:
    annotated = set(LaunchSpec.__annotations__)
    assert annotated == {key for key, _, _ in FIELDS}
    for key, types, default in FIELDS:
        assert default is REQUIRED or isinstance(default, types), key


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"stream_lnger": 3}, "stream_lnger"),  # a typo is an error, not a silent default
        ({"ready_timeout": "60"}, "ready_timeout"),
        ({"outage_buffer": True}, "outage_buffer"),  # bool is an int to Python, not here
        ({"env": ["A=1"]}, "env"),
    ],
)
def test_a_key_that_does_not_fit_is_named(change: dict[str, Any], named: str) -> None:
    with pytest.raises(SpecError, match=named):
        LaunchSpec({**MINIMAL, **change})


def test_a_missing_required_key_is_named() -> None:
    values = dict(MINIMAL)
    del values["attach_token"]
    with pytest.raises(SpecError, match="attach_token"):
        LaunchSpec(values)
    with pytest.raises(SpecError):
        LaunchSpec.from_line(json.dumps([MINIMAL]))
