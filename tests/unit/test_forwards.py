"""forward_ports and forward_bind as a kernelspec says them, and the host's listener
tables as /proc prints them."""

from __future__ import annotations

import socket

import pytest

from ssh_provisioner.errors import ProvisionerConfigError
from ssh_provisioner.forwards import ForwardSettings
from ssh_provisioner.host.ports import decode_address, listening_sockets, reachable_at


def test_auto_forwards_every_port_and_off_none() -> None:
    auto = ForwardSettings.parse("auto", "127.0.0.1")
    assert auto is not None
    assert auto.allows(6006)
    assert auto.allows(1)
    assert ForwardSettings.parse("OFF", "127.0.0.1") is None


def test_a_list_of_ports_and_ranges() -> None:
    settings = ForwardSettings.parse([6006, "8000-8100", "8888"], "127.0.0.1")
    assert settings is not None
    assert [p for p in (6006, 6007, 7999, 8000, 8100, 8101, 8888) if settings.allows(p)] == [
        6006, 8000, 8100, 8888,
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("ports", "bind", "words"),
    [
        (["80-x"], "127.0.0.1", "'80-x' is not a port"),
        ([0], "127.0.0.1", "0 is not a port"),
        (["9000-8000"], "127.0.0.1", "'9000-8000' is not a port"),
        ([True], "127.0.0.1", "True is not a port"),
        ("some", "127.0.0.1", "say auto, off, or a list"),
        ("auto", "localhost", "forward_bind: 'localhost' is not an IP address"),
    ],
)
def test_what_is_not_a_port_is_refused_by_name(ports: object, bind: str, words: str) -> None:
    with pytest.raises(ProvisionerConfigError, match=words):
        ForwardSettings.parse(ports, bind)


def test_addresses_as_proc_prints_them() -> None:
    assert decode_address("0100007F", socket.AF_INET) == "127.0.0.1"
    assert decode_address("00000000", socket.AF_INET) == "0.0.0.0"
    assert decode_address("00000000000000000000000001000000", socket.AF_INET6) == "::1"
    assert decode_address("0000000000000000FFFF00000100007F", socket.AF_INET6) == (
        "::ffff:127.0.0.1"
    )
    assert reachable_at("0.0.0.0") == "127.0.0.1"
    assert reachable_at("::") == "::1"
    assert reachable_at("::ffff:127.0.0.1") == "127.0.0.1"
    assert reachable_at("10.1.2.3") == "10.1.2.3"


def test_this_process_listeners_are_in_the_tables() -> None:
    with socket.socket() as v4, socket.socket(socket.AF_INET6) as v6:
        v4.bind(("127.0.0.1", 0))
        v4.listen(1)
        v6.bind(("::1", 0))
        v6.listen(1)
        found = set(listening_sockets().values())
        assert ("127.0.0.1", v4.getsockname()[1]) in found
        assert ("::1", v6.getsockname()[1]) in found
