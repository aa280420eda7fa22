"""The payload a host receives: the ``host`` modules an entry needs, as one program.

The remote shell runs ``python -I -S -c BOOTSTRAP``; the first line of its stdin is the
payload, JSON-encoded.  The payload registers each module under its real name (so a
traceback on the host names ``ssh_provisioner/host/relay.py`` and its line), then runs
the entry's ``main()``.  Nothing is written to the host's disk, no secret is on a
command line, and it costs no round trip: it goes out with the command.

``ssh-provisioner payload`` prints it, for whoever audits what runs on their hosts.
"""

from __future__ import annotations

import ast
import functools
import json
from importlib import resources

from .host.main import NO_SPEC

PACKAGE = "ssh_provisioner.host"
# Whatever a login shell printed before this line (a banner, `module` or conda chatter
# in .bashrc) is not the launcher's: the launcher's output begins after it.
LAUNCHER_BEGINS = "ssh-provisioner launcher output begins"
BOOTSTRAP = (
    "import sys,json;"
    "sys.stdout.write('\\n" + LAUNCHER_BEGINS + "\\n');sys.stdout.flush();"
    "exec(compile(json.loads(sys.stdin.readline()),'ssh-provisioner payload','exec'))"
)
ENTRIES = {
    "launch": "main",  # start a kernel and supervise it (also what a spare waits with)
    "reattach": "reattach",  # relay this channel to a running launcher's control socket
    "discover": "kernels",  # what the host can run: its kernelspecs and environments
}

# Runs first in the payload: registers the modules (in dependency order) and their
# source for tracebacks.  Python >= 3.6, standard library only.
_LOADER = """\
import sys, types


class _Sources:
    # Gives tracebacks each module's source, when one is printed (linecache.lazycache).
    def __init__(self, sources):
        self.sources = dict(sources)

    def get_source(self, name):
        return self.sources.get(name)


def _install(package, modules):
    for name in ("ssh_provisioner", package):
        module = sys.modules[name] = types.ModuleType(name)
        module.__path__ = []
    loader = _Sources(modules)
    for name, source in modules:
        module = sys.modules[name] = types.ModuleType(name)
        module.__file__ = name.replace(".", "/") + ".py"
        module.__package__, module.__loader__ = package, loader
        exec(compile(source, module.__file__, "exec"), module.__dict__)
    return sys.modules[modules[-1][0]]
"""


def _source(module: str) -> str:
    return resources.files(PACKAGE).joinpath(f"{module}.py").read_text("utf-8")


def _imports(module: str) -> list[str]:
    """The package's modules that ``module`` imports (``from .x import``)."""
    found = []
    for node in ast.walk(ast.parse(_source(module))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.append(node.module)
            else:
                found.extend(alias.name for alias in node.names)
    return found


def modules_for(entry: str) -> list[str]:
    """The modules ``entry`` needs, each after those it imports."""
    ordered: list[str] = []

    def visit(module: str, path: tuple[str, ...]) -> None:
        if module in path:
            raise ValueError(f"an import cycle in {PACKAGE}: {' -> '.join((*path, module))}")
        if module not in ordered:
            for imported in _imports(module):
                visit(imported, (*path, module))
            ordered.append(module)

    visit(ENTRIES[entry], ())
    return ordered


def _literal(source: str) -> str:
    """``source`` as a Python literal of one string per line: the payload reads as the
    modules it carries, line for line."""
    lines = source.splitlines(True) or [""]
    return "(\n" + "".join(f"    {line!r}\n" for line in lines) + ")"


@functools.cache
def payload(entry: str) -> str:
    """The program ``BOOTSTRAP`` runs for ``entry``."""
    names = [f"{PACKAGE}.{module}" for module in modules_for(entry)]
    modules = "".join(
        f"\n# ---- {name.replace('.', '/')}.py\n({name!r}, {_literal(_source(module))}),\n"
        for name, module in zip(names, modules_for(entry), strict=True)
    )
    return (
        f"# ssh-provisioner payload, entry {entry!r}: {', '.join(names)}\n"
        + _LOADER
        + f"\n\nsys.exit(_install({PACKAGE!r}, [{modules}]).main())\n"
    )


@functools.cache
def payload_line(entry: str) -> bytes:
    """The first line of the launcher's stdin: the payload, JSON-encoded."""
    return json.dumps(payload(entry)).encode() + b"\n"


__all__ = ["BOOTSTRAP", "LAUNCHER_BEGINS", "NO_SPEC", "modules_for", "payload", "payload_line"]
