"""Reattach: this SSH channel becomes a running launcher's control connection."""

import json
import socket
import sys
import threading

from .output import Client, emit
from .wire import encode_line


def reattach(line: str) -> int:
    """Relay this SSH channel to a running launcher's control socket (reattach).  The
    relay knows no secret: the two ends authenticate each other through it."""
    request = json.loads(line)["attach"]
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(request["control"])
    except OSError as exc:
        emit({"event": "error", "reason": "gone", "message": "no launcher there: %s" % exc})
        return 4
    conn.sendall(encode_line({"hello": str(request["hello"])}))

    def forward_stdin() -> None:
        for raw in iter(sys.stdin.buffer.readline, b""):
            conn.sendall(raw)
        conn.shutdown(socket.SHUT_WR)

    threading.Thread(target=forward_stdin, daemon=True).start()
    for data in iter(lambda: conn.recv(65536), b""):
        Client.write_stdout(data)
    return 0


def main() -> int:
    """The entry of a reattach payload: the request is the next stdin line."""
    return reattach(sys.stdin.readline())
