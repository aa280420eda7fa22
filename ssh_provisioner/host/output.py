"""Where the launcher's events and log lines go."""

import contextlib
import json
import sys
import threading
from typing import Any, Callable, Dict


class Client:
    """Where events go: the launcher's own stdout, or a reattached control connection."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.write: Callable[[bytes], Any] = self.write_stdout

    @staticmethod
    def write_stdout(data: bytes) -> None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()


CLIENT = Client()


def emit(event: Dict[str, Any]) -> None:
    data = (json.dumps(event) + "\n").encode()
    # A gone client is no error: supervision goes on without a listener.
    with CLIENT.lock, contextlib.suppress(OSError, ValueError):
        CLIENT.write(data)


def log(message: str) -> None:
    try:
        sys.stderr.write("ssh-provisioner launcher: " + message + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
