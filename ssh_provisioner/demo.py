"""`ssh-provisioner demo`: a kernel on a throwaway local SSH host, start to finish.

Starts a private sshd on 127.0.0.1 with generated keys in a temp dir (no /etc/ssh,
no ~/.ssh), writes a temporary kernelspec that names ssh-provisioner, runs a few
cells on the kernel, prints what came back with timings, and removes everything,
also on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

from .engine import shutdown_engine
from .throwaway import generate_key, running_sshd, sshd_missing_reason

CELLS = (
    "import os, socket\nprint('hostname:', socket.gethostname())",
    "print('SSH_CONNECTION:', os.environ.get('SSH_CONNECTION'))",
    "sum(i * i for i in range(10**6))",
)


def _write_kernelspec(directory: Path, config: dict[str, Any]) -> KernelSpecManager:
    kernel_dir = directory / "kernels" / "ssh-demo"
    kernel_dir.mkdir(parents=True)
    spec = {
        "argv": ["python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (ssh-provisioner demo)",
        "language": "python",
        "metadata": {
            "kernel_provisioner": {"provisioner_name": "ssh-provisioner", "config": config}
        },
    }
    (kernel_dir / "kernel.json").write_text(json.dumps(spec, indent=1))
    return KernelSpecManager(kernel_dirs=[str(directory / "kernels")])


def run_demo(out: TextIO = sys.stdout) -> int:
    """Synchronous on purpose: sshd and the temp dir outlive the event loop, so that
    they are removed after the kernel, even when Ctrl-C cancels the loop."""
    reason = sshd_missing_reason()
    if reason:
        print(f"ssh-provisioner demo: {reason}", file=sys.stderr)
        return 1
    user = getpass.getuser()
    with tempfile.TemporaryDirectory(prefix="sshp-demo-") as tmp:
        directory = Path(tmp)
        directory.chmod(0o755)
        client_key = directory / "client_ed25519"
        public_key = generate_key(client_key)
        with running_sshd(directory / "host", "127.0.0.1", public_key + "\n") as host:
            destination = host.destination(user)
            print(f"throwaway SSH host: {destination} (sshd pid {host.process.pid})", file=out)
            ksm = _write_kernelspec(
                directory,
                {
                    "hosts": [destination],
                    "connect_options": {
                        "client_keys": [str(client_key)],
                        "known_hosts": str(host.known_hosts),
                        "config": [],
                        "agent_path": "",
                    },
                    "remote_python": sys.executable,
                },
            )
            try:
                asyncio.run(_run_kernel(ksm, out))
            finally:
                shutdown_engine()  # its connections close before the throwaway sshd stops
    print("cleaned up: kernel, SSH host and temp dir are gone", file=out)
    return 0


async def _run_kernel(ksm: KernelSpecManager, out: TextIO) -> None:
    km = AsyncKernelManager(kernel_name="ssh-demo", kernel_spec_manager=ksm)
    try:
        await _run_cells(km, out)
    finally:
        if km.has_kernel or km.provisioner is not None:
            await km.shutdown_kernel(now=not km.has_kernel)


async def _run_cells(km: AsyncKernelManager, out: TextIO) -> None:
    started = time.perf_counter()
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        ready = time.perf_counter() - started
        print(f"kernel ready in {ready * 1000:.0f} ms", file=out)
        for code in CELLS:
            shown: list[str] = []

            def collect(msg: dict[str, Any], shown: list[str] = shown) -> None:
                kind, content = msg["msg_type"], msg["content"]
                if kind == "stream":
                    shown.append(content["text"].rstrip("\n"))
                elif kind == "execute_result":
                    shown.append(content["data"].get("text/plain", ""))
                elif kind == "error":
                    shown.append(f"{content['ename']}: {content['evalue']}")

            cell_started = time.perf_counter()
            await kc.execute_interactive(code, output_hook=collect, timeout=60)
            elapsed = (time.perf_counter() - cell_started) * 1000
            first_line = code.splitlines()[-1]
            print(f"\n>>> {first_line}    ({elapsed:.1f} ms)", file=out)
            for text in shown:
                print(text, file=out)
    finally:
        kc.stop_channels()
