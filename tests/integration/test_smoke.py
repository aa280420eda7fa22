from __future__ import annotations

import pytest
from jupyter_client.manager import AsyncKernelManager

from ..helpers import execute

pytestmark = pytest.mark.sshd


async def test_smoke(make_kernelspec, host_config) -> None:
    ksm, name = make_kernelspec(host_config)
    km = AsyncKernelManager(kernel_name=name, kernel_spec_manager=ksm)
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=30)
        out, reply = await execute(
            kc, "import os; print(os.environ.get('SSH_CONNECTION'), os.getuid())"
        )
        print(out, reply)
        assert reply["status"] == "ok"
    finally:
        kc.stop_channels()
        await km.shutdown_kernel()
