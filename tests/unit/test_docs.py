"""The configuration reference (docs/configuration.md) and the example kernelspecs stay
true; the README's links lead somewhere."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from jupyter_client.kernelspec import KernelSpec

from ssh_provisioner import SSHProvisioner
from ssh_provisioner.reference import BEGIN, END, config_reference

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "kernelspecs").glob("*/kernel.json"))


def test_the_config_reference_is_generated_from_the_traits() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    assert text[start:end] == config_reference(), (
        "docs/configuration.md is stale: run "
        "`python -m ssh_provisioner.reference docs/configuration.md`"
    )


@pytest.mark.parametrize("name", ["README.md", "CONTRIBUTING.md", *sorted(
    str(path.relative_to(ROOT)) for path in (ROOT / "docs").glob("*.md")
)])  # fmt: skip
def test_relative_links_lead_to_files(name: str) -> None:
    text = (ROOT / name).read_text()
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
        assert (ROOT / name).parent.joinpath(target).exists(), f"{name}: {target}"


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
