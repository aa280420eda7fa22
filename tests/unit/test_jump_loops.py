"""ProxyJump chains from an ssh config that loop are refused before any connection."""

from __future__ import annotations

from pathlib import Path

import pytest

from ssh_provisioner import ProvisionerConfigError
from ssh_provisioner.hosts import Host
from ssh_provisioner.pool import connect


@pytest.mark.parametrize(
    "config",
    [
        "Host a\n  ProxyJump a\n",  # through itself
        "Host a\n  ProxyJump b\nHost b\n  ProxyJump a\n",  # through each other
        "Host *\n  ProxyJump bastion\n",  # the bastion matches too
    ],
)
async def test_a_proxyjump_loop_is_a_config_error(tmp_path: Path, config: str) -> None:
    path = tmp_path / "ssh_config"
    path.write_text(config)
    with pytest.raises(ProvisionerConfigError, match="loops or is too long"):
        await connect(Host.parse("a"), {"config": [str(path)]}, connect_timeout=1.0)
