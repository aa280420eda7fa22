from __future__ import annotations

import socket

import asyncssh
import pytest

from ssh_provisioner import (
    AuthenticationError,
    HostKeyError,
    LaunchError,
    LaunchTimeout,
    SSHConnectError,
    SSHProvisionerError,
)
from ssh_provisioner.errors import translate_connect_error


@pytest.mark.parametrize(
    ("exc", "kind", "words"),
    [
        (socket.gaierror(-2, "Name or service not known"), SSHConnectError, "resolve"),
        (ConnectionRefusedError(111, "refused"), SSHConnectError, "refused"),
        (TimeoutError(), SSHConnectError, "timed out"),
        (asyncssh.PermissionDenied("no"), AuthenticationError, "authentication refused"),
        (asyncssh.HostKeyNotVerifiable("x"), HostKeyError, "unknown"),
        (asyncssh.ConnectionLost("reset"), SSHConnectError, "closed the connection"),
        (OSError(113, "No route to host"), SSHConnectError, "No route to host"),
        (ValueError("bad key file"), SSHConnectError, "bad connection options"),
    ],
)
def test_translation_names_host_and_cause(exc: BaseException, kind: type, words: str) -> None:
    error = translate_connect_error("alice@gpu1", exc)
    assert type(error) is kind
    assert isinstance(error, SSHProvisionerError)
    assert error.host == "alice@gpu1"
    assert "alice@gpu1" in str(error)
    assert words in str(error)


def test_changed_host_key_is_told_apart_from_unknown() -> None:
    exc = asyncssh.HostKeyNotVerifiable("x")
    changed = translate_connect_error(
        "gpu1", exc, known_host_entries=1, known_hosts_name="[gpu1]:2"
    )
    assert "CHANGED" in str(changed)
    assert "ssh-keygen -R '[gpu1]:2'" in str(changed)
    assert "CHANGED" not in str(translate_connect_error("gpu1", exc, known_host_entries=0))


def test_launch_timeout_is_both_a_launch_error_and_a_timeout() -> None:
    error = LaunchTimeout("slow", host="gpu1")
    assert isinstance(error, LaunchError)
    assert isinstance(error, TimeoutError)


def test_a_refused_session_is_a_session_limit_and_other_failures_are_not() -> None:
    from ssh_provisioner.errors import SessionLimitError, session_open_error

    refused = asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, "open failed")
    error = session_open_error("root@gpu1", "the launcher", refused)
    assert isinstance(error, SessionLimitError)
    assert isinstance(error, SSHConnectError)
    assert "root@gpu1" in str(error)
    assert "MaxSessions" in str(error)
    lost = session_open_error("root@gpu1", "the launcher", asyncssh.ConnectionLost("gone"))
    assert not isinstance(lost, SessionLimitError)
    assert "cannot open a session channel for the launcher" in str(lost)
