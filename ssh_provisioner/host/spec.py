"""The launch spec: every key a launcher is started with, its type and its default.

The provisioner builds it and the host's launcher reads it through this one definition
(``LaunchSpec.check``), so a key is named, typed and defaulted in one place.  It travels
as the second line of the launcher's stdin, never on a command line: it holds the
kernel's session key and the attach token.
"""

import json
from typing import Any, Dict, List, Optional, Tuple

DEFAULT_OUTAGE_BUFFER = 32 * 1024 * 1024  # all of a launcher's streams together
# The buffer also holds what is on its way to the client and not yet acknowledged (up
# to holding.IN_FLIGHT_MAX, the channel's window): a smaller one would drop output of a
# client that keeps up; one below IN_FLIGHT_MAX slows a long fat link.
MIN_OUTAGE_BUFFER = 4 * 1024 * 1024

REQUIRED = object()  # a key without a default

#   key                 types                 default               what it is
FIELDS: Tuple[Tuple[str, Tuple[type, ...], Any], ...] = (
    ("argv", (list,), REQUIRED),  # the kernel's argv: {connection_file}, {resource_dir}, ..
    ("connection", (dict,), REQUIRED),  # the connection file's key, scheme, name, CurveZMQ
    ("kernel_id", (str,), REQUIRED),  # names the runtime dir and the connection file
    ("attach_token", (str,), REQUIRED),  # both ends prove they know it (see wire)
    ("transport", (str,), "tcp"),  # the kernel's ZMQ transport on the host: tcp or ipc
    ("env", (dict,), {}),  # the kernel's environment, on top of the launcher's
    ("env_templates", (list,), []),  # [name, value]: {resource_dir} etc. substituted
    ("resource_files", (dict,), {}),  # file name: text, for the kernel's resource dir
    ("cwd", (str, type(None)), None),  # the kernel's working dir (default: home)
    ("ready_timeout", (int, float), 60),  # seconds for the kernel to open its ports
    ("orphan_timeout", (int, float), 60),  # seconds a kernel nobody attends to lives on
    ("liveness_timeout", (int, float), 0),  # silence taken for a lost client (0: never)
    ("outage_buffer", (int,), DEFAULT_OUTAGE_BUFFER),  # bytes held for away clients
    ("stream_linger", (int, float), 120),  # seconds a stream waits to be resumed
    ("relay_transport", (str, type(None)), None),  # the relay's own, if not the kernel's
    ("relay_bind", (str,), "127.0.0.1"),  # where a TCP relay listens (a Slurm node's IP)
    ("detach", (bool, str), False),  # leave the SSH session: True, or "in_place" (Slurm)
    ("cancel_job_when_orphaned", (bool,), False),  # scancel the Slurm job of an orphan
    ("walltime_notice", (dict, type(None)), None),  # {"after": s, "text": ...}
    ("watch_ports", (bool,), False),  # report the ports the kernel opens (forward_ports)
    ("mapped_cwd", (str, type(None)), None),  # the notebook's folder here, by path_map
    ("remote_kernel", (str, type(None)), None),  # run the host's own kernelspec NAME
    ("kernel_search", (list,), []),  # more folders of environments (discover_paths)
    ("kept_ready", (bool,), False),  # started ahead, for a start to take (prespawn)
)


class SpecError(ValueError):
    """A launch spec that does not fit the schema."""


class LaunchSpec:
    """A launch spec, checked against ``FIELDS``: unknown keys, wrong types and missing
    required keys are errors on either end, and every other key has its default."""

    argv: List[str]
    connection: Dict[str, Any]
    kernel_id: str
    attach_token: str
    transport: str
    env: Dict[str, str]
    env_templates: List[List[str]]
    resource_files: Dict[str, str]
    cwd: Optional[str]
    ready_timeout: float
    orphan_timeout: float
    liveness_timeout: float
    outage_buffer: int
    stream_linger: float
    relay_transport: Optional[str]
    relay_bind: str
    detach: Any  # bool, or "in_place"
    cancel_job_when_orphaned: bool
    walltime_notice: Optional[Dict[str, Any]]
    watch_ports: bool
    mapped_cwd: Optional[str]
    remote_kernel: Optional[str]
    kernel_search: List[str]
    kept_ready: bool

    def __init__(self, values: Dict[str, Any]) -> None:
        self.values = self.check(values)
        for key, value in self.values.items():
            setattr(self, key, value)

    @staticmethod
    def check(values: Dict[str, Any]) -> Dict[str, Any]:
        """``values`` with every default filled in; SpecError names what is wrong."""
        known = {key: (types, default) for key, types, default in FIELDS}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise SpecError("unknown launch spec key(s): %s" % ", ".join(unknown))
        missing = [
            key for key, (_, default) in known.items() if default is REQUIRED and key not in values
        ]
        if missing:
            raise SpecError("launch spec without %s" % ", ".join(missing))
        checked: Dict[str, Any] = {}
        for key, (types, default) in known.items():
            value = values.get(key, default)
            bad_bool = isinstance(value, bool) and bool not in types
            if not isinstance(value, types) or bad_bool:
                raise SpecError(
                    "launch spec key %s: %s, not %s"
                    % (key, type(value).__name__, " or ".join(t.__name__ for t in types))
                )
            checked[key] = value
        return checked

    @classmethod
    def from_line(cls, line: str) -> "LaunchSpec":
        values = json.loads(line)
        if not isinstance(values, dict):
            raise SpecError("a launch spec is a JSON object")
        return cls(values)

    def to_line(self) -> bytes:
        return (json.dumps(self.values) + "\n").encode()
