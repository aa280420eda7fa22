"""A real `jupyter server` process with ssh-provisioner kernelspecs, and a small client."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPRequest, HTTPResponse
from tornado.websocket import WebSocketClientConnection, websocket_connect

from ssh_provisioner.throwaway import free_port

JUPYTER = str(Path(sys.executable).parent / "jupyter")


@dataclass
class Server:
    url: str
    token: str
    process: subprocess.Popen[bytes]
    log_path: Path
    http: AsyncHTTPClient = field(default_factory=AsyncHTTPClient)

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        request = HTTPRequest(
            f"{self.url}{path}",
            method=method,
            headers={"Authorization": f"token {self.token}"},
            body=None if body is None and method in ("GET", "DELETE") else json.dumps(body or {}),
            request_timeout=120,
        )
        response: HTTPResponse = await self.http.fetch(request, raise_error=True)
        return json.loads(response.body) if response.body else None

    async def channels(self, kernel_id: str, session_id: str | None = None) -> Channels:
        ws_url = self.url.replace("http://", "ws://")
        session = session_id or uuid.uuid4().hex
        request = HTTPRequest(
            f"{ws_url}/api/kernels/{kernel_id}/channels?session_id={session}",
            headers={"Authorization": f"token {self.token}"},
        )
        connection = await websocket_connect(request)
        return Channels(connection, session)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, wait: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                return self.process.wait(wait)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()


@dataclass
class Channels:
    """The kernel's channels over Jupyter Server's websocket (JSON messages)."""

    ws: WebSocketClientConnection
    session: str

    def send(self, channel: str, msg_type: str, content: dict[str, Any], parent: Any = None) -> str:
        msg_id = uuid.uuid4().hex
        message = {
            "header": {"msg_id": msg_id, "msg_type": msg_type, "username": "test",
                       "session": self.session, "date": "", "version": "5.3"},
            "parent_header": parent or {},
            "metadata": {},
            "content": content,
            "channel": channel,
        }  # fmt: skip
        self.ws.write_message(json.dumps(message))
        return msg_id

    def execute(self, code: str, allow_stdin: bool = False) -> str:
        return self.send(
            "shell",
            "execute_request",
            {"code": code, "silent": False, "store_history": True, "user_expressions": {},
             "allow_stdin": allow_stdin, "stop_on_error": True},
        )  # fmt: skip

    async def receive(self, timeout: float = 30) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.read_message(), timeout)
        if raw is None:
            raise ConnectionError("websocket closed")
        message: dict[str, Any] = json.loads(raw)
        return message

    async def collect(self, msg_id: str, timeout: float = 30) -> list[dict[str, Any]]:
        """Messages answering ``msg_id`` until its execute_reply and idle status have come."""
        seen: list[dict[str, Any]] = []
        reply = idle = False
        deadline = time.monotonic() + timeout
        while not (reply and idle):
            message = await self.receive(max(0.1, deadline - time.monotonic()))
            if message.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            seen.append(message)
            kind = message["msg_type"]
            reply = reply or kind == "execute_reply"
            idle = idle or (kind == "status" and message["content"]["execution_state"] == "idle")
        return seen

    def close(self) -> None:
        self.ws.close()


def start_server(
    root: Path, jupyter_path: Path, *args: str, log_level: str = "DEBUG", app: str = "server"
) -> Server:
    """`jupyter server` (or another Jupyter Server app: nbclassic) on 127.0.0.1 with a
    token, waiting until /api/status answers.  A free port can be taken between its
    choice and the server's bind (by another test's kernel): then on another port."""
    for _ in range(3):
        server = _start_server(root, jupyter_path, *args, log_level=log_level, app=app)
        if server is not None:
            return server
    raise RuntimeError("jupyter server: its port was taken three times in a row")


def _start_server(
    root: Path, jupyter_path: Path, *args: str, log_level: str, app: str
) -> Server | None:
    port = free_port("127.0.0.1")
    token = uuid.uuid4().hex
    env = {
        **os.environ,
        "JUPYTER_PATH": str(jupyter_path),
        "JUPYTER_CONFIG_DIR": str(root / "config"),
        "JUPYTER_DATA_DIR": str(root / "data"),
        "JUPYTER_RUNTIME_DIR": str(root / "runtime"),
    }
    notebooks = root / "notebooks"
    notebooks.mkdir(exist_ok=True)
    log_path = root / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [JUPYTER, app, "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
             f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
             f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={notebooks}",
             f"--Application.log_level={log_level}", *args],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env,
        )  # fmt: skip
    server = Server(f"http://127.0.0.1:{port}", token, process, log_path)
    deadline = time.monotonic() + 60
    import urllib.request

    while True:
        if process.poll() is not None:
            if f"port {port} is not available" in server.log():
                return None
            raise RuntimeError(f"jupyter server exited:\n{server.log()[-3000:]}")
        try:
            request = urllib.request.Request(  # noqa: S310 - an http:// URL we built
                f"{server.url}/api/status", headers={"Authorization": f"token {token}"}
            )
            with urllib.request.urlopen(request, timeout=1):  # noqa: S310
                return server
        except (OSError, http.client.HTTPException):  # not up, or not it on that port
            if time.monotonic() > deadline:
                server.stop(signal.SIGKILL)
                message = f"jupyter server did not start:\n{server.log()[-3000:]}"
                raise RuntimeError(message) from None
            time.sleep(0.1)


def write_kernelspec(
    jupyter_path: Path,
    name: str,
    config: dict[str, Any],
    argv: list[str] | None = None,
    **metadata: Any,
) -> None:
    directory = jupyter_path / "kernels" / name
    directory.mkdir(parents=True)
    spec = {
        "argv": argv or ["python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Remote {name}",
        "language": "python",
        "metadata": {
            "kernel_provisioner": {"provisioner_name": "ssh-provisioner", "config": config},
            **metadata,
        },
    }
    (directory / "kernel.json").write_text(json.dumps(spec))


async def iopub_connected(channels: Channels) -> None:
    """Nudge until IOPub delivers (as JupyterLab does): after a (re)start the SUB socket
    reconnects on its own schedule, and PUB drops what is sent before it has."""
    for _ in range(50):
        msg_id = channels.send("shell", "kernel_info_request", {})
        try:
            while True:
                message = await channels.receive(timeout=0.5)
                if (
                    message["channel"] == "iopub"
                    and message["parent_header"].get("msg_id") == msg_id
                ):
                    return
        except TimeoutError:
            continue
    raise AssertionError("IOPub never delivered")


# The server extension's status (ssh_provisioner/server_extension.py) and /metrics.
STATUS = "/ssh-provisioner/api/status"


async def status_of(server: Server, kernel_id: str, since: int = -1) -> tuple[int, dict[str, Any]]:
    body = await server.request("GET", f"{STATUS}?since={since}")
    entry = next((k for k in body["kernels"] if k["kernel_id"] == kernel_id), {})
    return body["version"], entry


async def status_until(
    server: Server, kernel_id: str, wanted: Any, timeout: float, what: str
) -> dict[str, Any]:
    """Long-poll the status (as the page does) until ``wanted(entry)``."""
    deadline = time.monotonic() + timeout
    version, entry = await status_of(server, kernel_id)
    while not wanted(entry):
        assert time.monotonic() < deadline, f"status never showed {what}: {entry}"
        version, entry = await status_of(server, kernel_id, version)
    return entry


async def metrics(server: Server) -> dict[str, float]:
    response = await server.http.fetch(
        f"{server.url}/metrics", headers={"Authorization": f"token {server.token}"}
    )
    samples = {}
    for line in response.body.decode().splitlines():
        match = re.fullmatch(r"(ssh_provisioner_\w+(?:\{[^}]*\})?) (\S+)", line)
        if match:
            samples[match.group(1)] = float(match.group(2))
    return samples
