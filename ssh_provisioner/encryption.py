"""CurveZMQ for the kernel's channels, when the KernelManager asks for it.

jupyter_client >= 8.9 has ``KernelManager.transport_encryption`` (disabled, auto,
required) and kernelspecs declare ``metadata.supported_encryption: ["curve"]``.  The
kernel is the CURVE server of every channel; the manager and its clients know the
server's key pair from the connection info.  Over SSH the bytes are already encrypted
in transit, but on the host the forwarded ports are plain 127.0.0.1 ports: with curve,
another user of that host who connects to them cannot speak to the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import zmq

from .errors import ProvisionerConfigError


@dataclass(frozen=True)
class CurveKeys:
    """The kernel's CURVE server key pair (Z85 text), shared with its manager."""

    public: str
    secret: str = ""

    def __repr__(self) -> str:  # the secret half never reaches a log line
        return f"CurveKeys(public={self.public!r})"

    def connection_fields(self) -> dict[str, str]:
        return {"curve_publickey": self.public, "curve_secretkey": self.secret}

    @classmethod
    def from_connection_info(cls, info: dict[str, Any]) -> CurveKeys | None:
        public, secret = info.get("curve_publickey"), info.get("curve_secretkey")
        if not public or not secret:
            return None
        return cls(_text(public), _text(secret))


def negotiate(manager: Any, requested: str | None, kernel_name: str) -> CurveKeys | None:
    """Called from pre_launch: the keys to start the kernel with, or None for none.

    Follows jupyter_client's rules: ``auto`` encrypts when the kernelspec declares curve
    support, ``required`` always does (the manager itself refuses a kernelspec without
    it).  Keys already on the manager are reused, so a restarted kernel keeps them like
    it keeps the session key.  Managers older than 8.9 have no such setting: no curve.
    """
    policy_of = getattr(manager, "_transport_encryption_policy", None)
    if policy_of is None:
        return None
    policy = policy_of(requested)
    if policy == "disabled":
        return None
    if policy == "auto" and not manager._kernel_supports_curve_encryption():
        return None
    if not zmq.has("curve"):
        raise ProvisionerConfigError(
            f"kernel {kernel_name!r}: transport_encryption={policy!r} needs CurveZMQ, "
            "and this pyzmq/libzmq was built without it"
        )
    if manager.curve_publickey is None or manager.curve_secretkey is None:
        public, secret = zmq.curve_keypair()
        manager.curve_publickey, manager.curve_secretkey = public, secret
    return CurveKeys(_text(manager.curve_publickey), _text(manager.curve_secretkey))


def adopt(manager: Any, keys: CurveKeys | None) -> None:
    """Hand reattached keys to the manager, so its clients connect with them."""
    if manager is None or keys is None or not hasattr(manager, "curve_publickey"):
        return
    manager.curve_publickey = keys.public.encode()
    manager.curve_secretkey = keys.secret.encode()


def _text(value: str | bytes) -> str:
    return value.decode("ascii") if isinstance(value, bytes) else value
