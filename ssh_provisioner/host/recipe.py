"""What a kernel is started with: its argv, environment, working directory, resource
dir and connection file, from the launch spec (and, with ``remote_kernel``, from the
host's own kernelspec, read at each start)."""

import json
import os
from typing import Any, Dict, List, Optional, Tuple

from .process import pick_tcp_ports
from .spec import LaunchSpec
from .wire import CHANNELS


class LaunchFailed(Exception):
    """The kernel did not start: ``reason`` is a word the provisioner knows."""

    def __init__(self, reason: str, message: str, stderr: str = "", status: Optional[int] = None):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.stderr = stderr
        self.status = status


class KernelRecipe:
    def __init__(self, spec: LaunchSpec, runtime_dir: str, prologue_cwd: str) -> None:
        self.spec = spec
        self.runtime_dir = runtime_dir  # private (0700): the connection file goes here
        self.prologue_cwd = prologue_cwd  # where a Slurm prologue's `cd` left its shell
        self.cwd_note = ""  # why the kernel is not in its mapped folder

    def write_private(self, name: str, data: bytes) -> str:
        path = os.path.join(self.runtime_dir, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return path

    def resource_dir(self) -> str:
        files = self.spec.resource_files
        if not files:
            return self.runtime_dir
        import base64  # only here: every import delays the kernel's start

        path = os.path.join(self.runtime_dir, "resources")
        os.mkdir(path, 0o700)
        for name, encoded in files.items():
            if "/" in name or name in (".", ".."):
                continue
            with open(os.path.join(path, name), "wb") as f:
                f.write(base64.b64decode(encoded))
        return path

    def kernel_env(self, host_templates: Optional[List[List[str]]] = None) -> Dict[str, str]:
        env = dict(os.environ)
        env.update(self.spec.env)
        templates = [*(host_templates or []), *self.spec.env_templates]
        if templates:
            from string import Template

            for name, template in templates:
                env[name] = Template(template).safe_substitute(env)
        return env

    def kernel_cwd(self) -> str:
        # The notebook's folder as path_map maps it, if it is here; else remote_cwd,
        # else where a Slurm prologue's `cd` left its shell, else home.
        mapped = self.spec.mapped_cwd
        if mapped:
            if os.path.isdir(mapped):
                return mapped
            self.cwd_note = "%s (the notebook's folder, by path_map) is not a directory here" % (
                mapped
            )
        cwd = os.path.expanduser(self.spec.cwd or self.prologue_cwd or "~")
        if not os.path.isdir(cwd):
            raise LaunchFailed(
                "cwd-not-found", "remote_cwd %r is not a directory on the host" % cwd
            )
        return cwd

    def endpoints(self, attempt: int) -> Dict[str, Any]:
        if self.spec.transport == "ipc":
            prefix = os.path.join(self.runtime_dir, "k%d" % attempt)
            return {name: "%s-%d" % (prefix, i + 1) for i, name in enumerate(CHANNELS)}
        return dict(zip(CHANNELS, pick_tcp_ports(len(CHANNELS))))

    def connection_file(self, endpoints: Dict[str, Any], attempt: int) -> str:
        info: Dict[str, Any] = dict(self.spec.connection)
        info["transport"] = self.spec.transport
        if self.spec.transport == "ipc":
            info["ip"] = endpoints["shell"].rsplit("-", 1)[0]
            for i, name in enumerate(CHANNELS):
                info[name + "_port"] = i + 1
        else:
            info["ip"] = "127.0.0.1"
            for name in CHANNELS:
                info[name + "_port"] = endpoints[name]
        name = "kernel-%s-%d.json" % (self.spec.kernel_id, attempt)
        return self.write_private(name, json.dumps(info, indent=1).encode())

    def kernel_command(self) -> Tuple[List[str], Dict[str, str], str]:
        """(argv, env, resource dir): the kernelspec's, or the host's own kernelspec
        ``remote_kernel`` names, read now (a change on the host needs no reinstall)."""
        if not self.spec.remote_kernel:
            return list(self.spec.argv), self.kernel_env(), self.resource_dir()
        from .kernels import find_kernelspec

        try:
            directory, kernelspec = find_kernelspec(
                self.spec.remote_kernel, self.spec.kernel_search
            )
        except LookupError as exc:
            raise LaunchFailed("no-kernelspec", str(exc)) from None
        templates = [[str(k), str(v)] for k, v in (kernelspec.get("env") or {}).items()]
        env = self.kernel_env(templates)
        return [str(arg) for arg in kernelspec["argv"]], env, directory
