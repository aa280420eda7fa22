"""The README's configuration reference and the example kernelspecs stay true."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jupyter_client.kernelspec import KernelSpec

from ssh_provisioner import SSHProvisioner
from ssh_provisioner.reference import BEGIN, END, config_reference

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "kernelspecs").glob("*/kernel.json"))


def test_readme_config_reference_is_generated_from_the_traits() -> None:
    readme = (ROOT / "README.md").read_text()
    start, end = readme.index(BEGIN), readme.index(END) + len(END)
    assert readme[start:end] == config_reference(), (
        "README is stale: paste the output of `python -m ssh_provisioner.reference`"
    )


def test_there_are_examples() -> None:
    assert EXAMPLES


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.parent.name)
def test_example_kernelspec_loads_and_its_config_parses(path: Path) -> None:
    data = json.loads(path.read_text())
    spec = KernelSpec.from_resource_dir(str(path.parent))
    provisioner = data["metadata"]["kernel_provisioner"]
    assert provisioner["provisioner_name"] == "ssh-provisioner"
    instance = SSHProvisioner(kernel_spec=spec, kernel_id="x", **provisioner["config"])
    assert instance.hosts
    assert (path.parent / "README.md").is_file()
