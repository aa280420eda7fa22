"""What a host can run: its Jupyter kernelspecs, and the environments with ipykernel.

Read from the filesystem, with nothing imported from the environments and no Python of
theirs run: kernelspecs in every Jupyter data directory the host's users would use
(``JUPYTER_PATH``, ``~/.local/share/jupyter``, each environment's ``share/jupyter``,
``/usr/local/share`` and ``/usr/share``, and what ``jupyter kernelspec list`` says where
Jupyter is installed); conda environments (``~/.conda/environments.txt`` and the usual
install places) and virtual environments (the usual places, and ``search`` roots) whose
site-packages hold ipykernel.
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys
from typing import Any, Dict, Iterable, List, Optional, Tuple

CONDA_ROOTS = ("~/miniconda3", "~/anaconda3", "~/miniforge3", "~/mambaforge", "/opt/conda")
VENV_ROOTS = ("~/.venvs", "~/venvs", "~/.virtualenvs", "~/envs", "~/.pyenv/versions")
JUPYTER_LIST_TIMEOUT = 10.0


def expand(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def python_version(prefix: str) -> Optional[str]:
    """X.Y of the environment at ``prefix``, from its layout (nothing is run)."""
    try:
        with open(os.path.join(prefix, "pyvenv.cfg")) as f:
            found = re.search(r"^version(?:_info)?\s*=\s*(\d+\.\d+)", f.read(), re.M)
        if found:
            return found.group(1)
    except OSError:
        pass
    libs = sorted(glob.glob(os.path.join(prefix, "lib", "python3.*")))
    return os.path.basename(libs[-1])[6:] if libs else None


def has_ipykernel(prefix: str) -> bool:
    pattern = os.path.join(prefix, "lib", "python3.*", "site-packages", "ipykernel")
    return any(os.path.isdir(path) for path in glob.glob(pattern))


def environments(search: Iterable[str]) -> List[Tuple[str, str]]:
    """(kind, prefix) of each conda env and venv found, without duplicates."""
    found: Dict[str, str] = {}

    def consider(kind: str, prefix: str) -> None:
        prefix = expand(prefix)
        if prefix not in found and os.path.isfile(os.path.join(prefix, "bin", "python")):
            found[prefix] = kind

    try:
        with open(expand("~/.conda/environments.txt")) as f:
            for line in f:
                if line.strip():
                    consider("conda", line.strip())
    except OSError:
        pass
    for root in CONDA_ROOTS:
        consider("conda", root)
        for prefix in sorted(glob.glob(os.path.join(expand(root), "envs", "*"))):
            consider("conda", prefix)
    for root in [*VENV_ROOTS, *search]:
        for prefix in sorted(glob.glob(os.path.join(expand(root), "*"))):
            is_conda = os.path.isdir(os.path.join(prefix, "conda-meta"))
            consider("conda" if is_conda else "venv", prefix)
        consider("venv", root)  # a search root may be an environment itself
    return [(kind, prefix) for prefix, kind in found.items()]


def data_dirs(prefixes: Iterable[str]) -> List[str]:
    """Jupyter data directories, in Jupyter's order of precedence."""
    dirs = [p for p in os.environ.get("JUPYTER_PATH", "").split(os.pathsep) if p]
    data_home = os.environ.get("XDG_DATA_HOME") or "~/.local/share"
    dirs.append(os.path.join(data_home, "jupyter"))
    dirs += [os.path.join(prefix, "share", "jupyter") for prefix in prefixes]
    dirs += ["/usr/local/share/jupyter", "/usr/share/jupyter"]
    unique: List[str] = []
    for path in map(expand, dirs):
        if path not in unique:
            unique.append(path)
    return unique


def jupyter_listed() -> Dict[str, str]:
    """name -> kernelspec dir, as the host's own ``jupyter kernelspec list`` says."""
    jupyter = shutil.which("jupyter")
    if not jupyter:
        return {}
    try:
        out = subprocess.run(
            [jupyter, "kernelspec", "list", "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            timeout=JUPYTER_LIST_TIMEOUT,
            check=False,
        ).stdout
        listed = json.loads(out.decode("utf-8", "replace"))["kernelspecs"]
        return {str(name): str(info["resource_dir"]) for name, info in listed.items()}
    except (OSError, ValueError, KeyError, TypeError, subprocess.SubprocessError):
        return {}


def kernelspec_dirs(prefixes: Iterable[str]) -> Dict[str, str]:
    """name -> directory of every kernelspec, the first of each name winning."""
    found: Dict[str, str] = {}
    for data_dir in data_dirs(prefixes):
        for spec_file in sorted(glob.glob(os.path.join(data_dir, "kernels", "*", "kernel.json"))):
            found.setdefault(os.path.basename(os.path.dirname(spec_file)).lower(), spec_file)
    for name, directory in jupyter_listed().items():
        found.setdefault(name.lower(), os.path.join(directory, "kernel.json"))
    return {name: os.path.dirname(path) for name, path in found.items()}


def read_kernelspec(directory: str) -> Optional[Dict[str, Any]]:
    try:
        with open(os.path.join(directory, "kernel.json")) as f:
            spec: Dict[str, Any] = json.load(f)
    except (OSError, ValueError):
        return None
    argv = spec.get("argv") if isinstance(spec, dict) else None
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        return None
    return spec


def find_kernelspec(name: str, search: Iterable[str] = ()) -> Tuple[str, Dict[str, Any]]:
    """(directory, kernel.json) of the host's kernelspec ``name``; LookupError says where
    it looked."""
    prefixes = [sys.prefix] + [prefix for _, prefix in environments(search)]
    dirs = kernelspec_dirs(prefixes)
    directory = dirs.get(name.lower())
    spec = read_kernelspec(directory) if directory else None
    if directory is None or spec is None:
        where = ", ".join(data_dirs(prefixes))
        raise LookupError(
            "no kernelspec %r on this host (%s); it has: %s"
            % (name, "unreadable" if directory else "looked in " + where, ", ".join(sorted(dirs)))
        )
    return directory, spec


def discover(search: Iterable[str] = ()) -> List[Dict[str, Any]]:
    """Every kernel the host can run: its kernelspecs, then the environments with
    ipykernel that no kernelspec already runs."""
    envs = environments(search)
    prefixes = [sys.prefix] + [prefix for _, prefix in envs]
    entries: List[Dict[str, Any]] = []
    pythons = set()
    for name, directory in sorted(kernelspec_dirs(prefixes).items()):
        spec = read_kernelspec(directory)
        if spec is None:
            continue
        argv = [str(a) for a in spec["argv"]]
        pythons.add(argv[0])
        entries.append(
            {
                "name": name,
                "kind": "kernelspec",
                "display_name": str(spec.get("display_name") or name),
                "language": str(spec.get("language") or ""),
                "argv": argv,
                "env": spec.get("env") or {},
                "path": directory,
            }
        )
    for kind, prefix in envs:
        python = os.path.join(prefix, "bin", "python")
        if python in pythons or not has_ipykernel(prefix):
            continue
        version = python_version(prefix)
        name = re.sub(r"[^a-z0-9._-]+", "-", os.path.basename(prefix).lower()) or "env"
        entries.append(
            {
                "name": name,
                "kind": kind,
                "display_name": "Python %s (%s)" % (version or "3", os.path.basename(prefix)),
                "language": "python",
                "argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "env": {},
                "path": prefix,
                "version": version,
            }
        )
    return entries


def main() -> int:
    """The entry of a discovery payload: the request ({"search": [...]}) is the next
    stdin line; the answer is one JSON line."""
    request = json.loads(sys.stdin.readline() or "{}")
    search = [str(path) for path in request.get("search") or []]
    print(json.dumps({"event": "discovered", "kernels": discover(search)}))
    return 0
