"""CurveZMQ negotiation follows jupyter_client's transport_encryption rules."""

from __future__ import annotations

import pytest
from jupyter_client.kernelspec import KernelSpec
from jupyter_client.manager import KernelManager

from ssh_provisioner.encryption import CurveKeys, adopt, negotiate


def manager(policy: str, *, declares_curve: bool) -> KernelManager:
    km = KernelManager(transport_encryption=policy)
    metadata = {"supported_encryption": ["curve"]} if declares_curve else {}
    km._kernel_spec = KernelSpec(argv=["python3"], display_name="t", metadata=metadata)
    return km


@pytest.mark.parametrize(
    ("policy", "declares_curve", "expected"),
    [
        ("disabled", True, False),
        ("auto", False, False),
        ("auto", True, True),
        ("required", True, True),
    ],
)
def test_curve_only_when_asked_for_and_supported(
    policy: str, declares_curve: bool, expected: bool
) -> None:
    km = manager(policy, declares_curve=declares_curve)
    keys = negotiate(km, None, "t")
    assert (keys is not None) == expected
    if keys is not None:
        assert km.curve_publickey == keys.public.encode()
        assert km.curve_secretkey == keys.secret.encode()
    else:
        assert km.curve_publickey is None


def test_a_request_overrides_the_managers_setting() -> None:
    km = manager("disabled", declares_curve=True)
    assert negotiate(km, "auto", "t") is not None


def test_a_restart_keeps_the_keys() -> None:
    km = manager("auto", declares_curve=True)
    first = negotiate(km, None, "t")
    assert negotiate(km, None, "t") == first


def test_no_curve_without_a_kernel_manager() -> None:
    assert negotiate(None, "required", "t") is None


def test_the_secret_stays_out_of_repr_and_keys_round_trip() -> None:
    keys = CurveKeys("P" * 40, "S" * 40)
    assert "S" * 40 not in repr(keys)
    assert CurveKeys.from_connection_info(keys.connection_fields()) == keys
    assert CurveKeys.from_connection_info({"key": "k"}) is None
    km = KernelManager()
    adopt(km, keys)
    assert (km.curve_publickey, km.curve_secretkey) == (b"P" * 40, b"S" * 40)
