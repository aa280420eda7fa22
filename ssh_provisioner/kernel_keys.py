"""The kernel's keys, as both ends of its connection info carry them.

The message-signing key, its scheme and the kernel's name are the KernelManager's (or
our own, when a provisioner runs without one: the key then lives as long as the
provisioner); the CurveZMQ pair is there when the manager asks for transport encryption.
The host's kernel gets them in its connection file; the local clients get them with the
local ports.  A reattach takes them from the saved connection info.
"""

from __future__ import annotations

import secrets
from typing import Any, cast

from jupyter_client.connect import KernelConnectionInfo

from .encryption import CurveKeys, adopt


class KernelKeys:
    def __init__(self, parent: Any) -> None:
        self.parent = parent  # the KernelManager, if any
        self.curve: CurveKeys | None = None
        self._standalone_key: bytes | None = None

    def session_fields(self) -> tuple[bytes, str, str]:
        """(key, signature scheme, kernel name)."""
        session = getattr(self.parent, "session", None)
        if session is not None:
            key: bytes = session.key
        else:
            if self._standalone_key is None:
                self._standalone_key = secrets.token_hex(32).encode()
            key = self._standalone_key
        scheme = str(getattr(session, "signature_scheme", "hmac-sha256"))
        return key, scheme, str(getattr(self.parent, "kernel_name", ""))

    def for_host(self) -> dict[str, Any]:
        """The connection file's secrets and names, as the host's kernel gets them."""
        key, scheme, kernel_name = self.session_fields()
        return {
            "key": key.decode(),
            "signature_scheme": scheme,
            "kernel_name": kernel_name,
            **(self.curve.connection_fields() if self.curve else {}),
        }

    def local_connection_info(self, ports: dict[str, int]) -> KernelConnectionInfo:
        """What local clients connect with: the local ends of the kernel's ports."""
        key, scheme, kernel_name = self.session_fields()
        info = {
            "transport": "tcp",
            "ip": "127.0.0.1",
            "shell_port": ports["shell"],
            "iopub_port": ports["iopub"],
            "stdin_port": ports["stdin"],
            "control_port": ports["control"],
            "hb_port": ports["hb"],
            "key": key,
            "signature_scheme": scheme,
            "kernel_name": kernel_name,
            **(self.curve.connection_fields() if self.curve else {}),
        }
        # jupyter_client carries the key as bytes (Session.key), whatever the TypedDict says
        return cast(KernelConnectionInfo, info)

    def adopt_saved(self, saved_info: dict[str, Any]) -> None:
        """Take the keys of a kernel started elsewhere (its saved connection info)."""
        self.curve = CurveKeys.from_connection_info(saved_info)
        adopt(self.parent, self.curve)
        key = saved_info.get("key")
        if key and self.session_fields()[0] != _as_bytes(key):
            parent_session = getattr(self.parent, "session", None)
            if parent_session is not None:
                parent_session.key = _as_bytes(key)
            else:
                self._standalone_key = _as_bytes(key)


def _as_bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode()
