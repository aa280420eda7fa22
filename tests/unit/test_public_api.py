from __future__ import annotations

from importlib.metadata import entry_points

import ssh_provisioner


def test_all_is_exact() -> None:
    public = {
        name
        for name in vars(ssh_provisioner)
        if not name.startswith("_") and name not in {"annotations"}
    }
    modules = {name for name in public if type(getattr(ssh_provisioner, name)).__name__ == "module"}
    assert sorted(public - modules) == sorted(set(ssh_provisioner.__all__) - {"__version__"})


def test_entry_point_names_the_provisioner() -> None:
    (ep,) = entry_points(group="jupyter_client.kernel_provisioners", name="ssh-provisioner")
    assert ep.load() is ssh_provisioner.SSHProvisioner
