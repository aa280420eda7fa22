"""A wheel without the built JupyterLab extension would install and say nothing: refuse
to build one (an editable install links the checkout's build instead: .ci/labextension)."""

from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

BUILT = Path(__file__).parent / "ssh_provisioner/labextensions/ssh-provisioner/package.json"


class LabextensionCheck(BuildHookInterface):  # type: ignore[misc]
    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name == "wheel" and version != "editable" and not BUILT.is_file():
            raise RuntimeError(
                f"{BUILT.parent} is missing: build the JupyterLab extension first "
                "(bash .ci/labextension; it needs Node.js and npm)"
            )
