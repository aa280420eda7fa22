"""The supervision channel through the relay: a proven channel handed to the launcher's
control socket, byte for byte, in a thread of its own (its own challenge-response runs
through it end to end)."""

import contextlib
import socket
import threading


def bridge(
    client: socket.socket,
    control_path: str,
    unsent: bytes,
    pending: bytes,
    passed_on: threading.Event,
) -> None:
    """Relay ``client`` to the control socket at ``control_path`` until either ends;
    ``passed_on`` is set once everything the control socket said has been sent."""
    client.setblocking(True)
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.sendall(unsent)
        control.connect(control_path)
        control.sendall(pending)
    except OSError:
        client.close()
        control.close()
        passed_on.set()
        return

    def pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            for data in iter(lambda: source.recv(65536), b""):
                sink.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    upstream = threading.Thread(target=pump, args=(client, control), daemon=True)
    upstream.start()
    pump(control, client)
    passed_on.set()
    upstream.join()
    client.close()
    control.close()
