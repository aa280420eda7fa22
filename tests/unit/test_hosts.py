from __future__ import annotations

import pytest

from ssh_provisioner import Host, ProvisionerConfigError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("gpu1", Host("gpu1")),
        ("alice@gpu1", Host("gpu1", user="alice")),
        ("alice@gpu1:2222", Host("gpu1", user="alice", port=2222)),
        ("gpu1.example.org:22", Host("gpu1.example.org", port=22)),
        ("[::1]:2200", Host("::1", port=2200)),
        ("bob@[fe80::1%eth0]:22", Host("fe80::1%eth0", user="bob", port=22)),
        ("::1", Host("::1")),
        ("  spaced  ", Host("spaced")),
        ("a@b@host", Host("host", user="a@b")),
    ],
)
def test_parse(text: str, expected: Host) -> None:
    assert Host.parse(text) == expected


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("@gpu1", "empty user"),
        ("gpu1:0", "invalid port"),
        ("gpu1:65536", "invalid port"),
        ("gpu1:ssh", "invalid port"),
        ("gpu 1", "invalid host name"),
        ("gpu1;rm -rf /", "invalid host name"),
        ("[::1", r"not \[address\]:port"),
    ],
)
def test_parse_rejects(text: str, problem: str) -> None:
    with pytest.raises(ProvisionerConfigError, match=problem):
        Host.parse(text)


def test_round_trip_and_connect_kwargs() -> None:
    host = Host.parse("alice@[::1]:2200")
    assert str(host) == "alice@[::1]:2200"
    assert Host.parse(str(host)) == host
    assert host.connect_kwargs() == {"host": "::1", "username": "alice", "port": 2200}
    assert Host.parse("gpu1").connect_kwargs() == {"host": "gpu1"}  # ssh config decides
    assert host.known_hosts_name == "[::1]:2200"
    assert Host.parse("gpu1:22").known_hosts_name == "gpu1"
